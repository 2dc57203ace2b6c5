// One QEMU's configuration and the command line it stands for (DESIGN: guest RAM a shared file under
// /dev/shm for the uffd hand-over and x-ignore-shared, the agent on a virtio-serial port, QMP on a unix
// socket), with the checks a config passes before any QEMU starts and where the QEMU binary is found.

import Foundation

/// One QEMU's configuration; `arguments` is the command line it stands for.
public struct QEMUConfig: Sendable, Equatable {
    /// The virtio-serial port name the guest agent opens.
    public static let agentPortName = "org.epcopy.agent.0"
    /// A second port for the test guest's memory tester: its text lines must not mix with the agent's frames.
    public static let logPortName = "org.epcopy.log.0"

    /// Names the VM in epcopy's messages, thread names and default file names.
    public var name: String
    public var memoryMiB: Int
    /// Extra guest RAM beyond `memoryMiB`, in KiB (a multiple of 8: QEMU rounds `-m` to 8 KiB). Under TCG it is
    /// 8 by default: QEMU before 9.0 loses dirty-page updates of RAM blocks whose size is a multiple of 256 KiB
    /// (the 64-pages-at-a-time bitmap sync does not reset TCG's cached write permissions — upstream
    /// "physmem: Fix migration dirty bitmap coherency with TCG memory access"), which corrupts guests
    /// migrated with QEMU's own precopy (4 of 52 runs here crashed; 0 of 30 with 8 KiB more).
    public var ramPadKiB: Int
    /// The RAM file's size: `memoryMiB` MiB plus `ramPadKiB` KiB.
    public var ramBytes: UInt64 { UInt64(memoryMiB) << 20 + UInt64(ramPadKiB) << 10 }
    /// RAM-file pages.
    public var regionPages: UInt64 { ramBytes >> 12 }
    public var vcpus: Int
    public var kernel: String?
    public var initrd: String?
    /// The kernel command line; needs `kernel`.
    public var append: String?
    /// Guest RAM: a shared file, normally under /dev/shm.
    public var ramFile: String
    public var qmpSocket: String
    /// Where the guest's serial console (ttyS0) is written.
    public var serialLog: String
    /// The host end of the agent's virtio-serial port (QEMU listens on it).
    public var agentSocket: String
    /// What the guest writes to the `org.epcopy.log.0` port (QEMU appends to it).
    public var portLog: String
    public var pidFile: String
    /// Where QEMU's stderr goes when it outlives epcopy (otherwise a pipe epcopy drains).
    public var stderrLog: String
    /// QEMU survives the death of the epcopy process that started it (a destination whose daemon may be
    /// restarted and adopt it): a keeper (timeout(1)) holds the deadline and QEMU is bound to the keeper by its
    /// parent-death signal instead of to epcopy, and stderr goes to `stderrLog`.
    public var outlivesEpcopy: Bool
    /// Adds `-incoming defer`: the VM waits for `migrate-incoming`.
    public var incoming: Bool
    /// Added to (and overriding) epcopy's own environment, e.g. LD_PRELOAD for the hand-over shim.
    public var environment: [String: String]
    /// "tcg" or "kvm".
    public var accel: String
    /// A qcow2 disk (an overlay on shared storage: both QEMUs of a migration open the same file; QEMU hands
    /// the image over at the end of the device-state migration). epcopy never deletes it.
    public var disk: String?
    /// Guest TCP ports forwarded from `forwardHost` (QEMU user networking, virtio-net): the VM's services are
    /// reached at the address of the host it currently runs on.
    public var forwards: [UInt16]
    public var forwardHost: String
    /// Appended after everything else.
    public var extraArgs: [String]
    /// The watchdog SIGKILLs QEMU this many seconds after it was spawned.
    public var deadlineSeconds: Double
    /// Teardown leaves the RAM file in place (a fenced source's RAM must outlive its QEMU).
    public var keepRAMFile: Bool
    /// Teardown leaves the serial log in place.
    public var keepSerialLog: Bool
    /// nil: EPCOPY_QEMU, else qemu-system-x86_64 on PATH (as `epcopy probe` finds it).
    public var qemuPath: String?

    /// A configuration whose files are named after `name`: RAM in `ramDirectory`, everything else in
    /// `runDirectory`. The accelerator is the probe's choice (TCG unless EPCOPY_ACCEL=kvm works).
    public init(name: String, memoryMiB: Int = 512, vcpus: Int = 1, runDirectory: String = "/tmp",
                ramDirectory: String = "/dev/shm", accel: String? = nil, deadlineSeconds: Double = 600) {
        let base = "epcopy-\(name)"
        self.name = name
        self.memoryMiB = memoryMiB
        self.ramPadKiB = 0
        self.vcpus = vcpus
        self.kernel = nil
        self.initrd = nil
        self.append = nil
        self.ramFile = "\(ramDirectory)/\(base).ram"
        self.qmpSocket = "\(runDirectory)/\(base).qmp"
        self.serialLog = "\(runDirectory)/\(base).serial.log"
        self.agentSocket = "\(runDirectory)/\(base).agent"
        self.portLog = "\(runDirectory)/\(base).port.log"
        self.pidFile = "\(runDirectory)/\(base).pid"
        self.stderrLog = "\(runDirectory)/\(base).stderr.log"
        self.outlivesEpcopy = false
        self.incoming = false
        self.environment = [:]
        self.accel = accel ?? Self.defaultAccel()
        self.ramPadKiB = self.accel == "tcg" ? 8 : 0
        self.extraArgs = []
        self.disk = nil
        self.forwards = []
        self.forwardHost = "127.0.0.1"
        self.deadlineSeconds = deadlineSeconds
        self.keepRAMFile = false
        self.keepSerialLog = false
        self.qemuPath = nil
    }

    /// The probe's accelerator choice for this host.
    public static func defaultAccel(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        HostProbe.chooseAccel(qemuPresent: true, kvmDevice: HostProbe.kvmDeviceUsable(), environment: environment).0
    }

    /// QEMU's arguments (without the executable), in the fixed DESIGN order; `extraArgs` come last.
    public var arguments: [String] {
        var args = [
            "-accel", accel, "-nodefaults", "-display", "none",
            "-machine", "q35,memory-backend=mem0",
            "-m", ramPadKiB == 0 ? "\(memoryMiB)M" : "\(memoryMiB * 1024 + ramPadKiB)K", "-smp", "\(vcpus)",
            "-object", "memory-backend-file,id=mem0,size=\(ramPadKiB == 0 ? "\(memoryMiB)M" : "\(memoryMiB * 1024 + ramPadKiB)K"),"
                + "mem-path=\(ramFile),share=on",
        ]
        if let kernel { args += ["-kernel", kernel] }
        if let initrd { args += ["-initrd", initrd] }
        if let append { args += ["-append", append] }
        args += [
            "-serial", "file:\(serialLog)",
            // Port 0 is reserved for a console, so three ports hold the agent's and the log's. Few ports keep the
            // vrings the device-state load touches (and so the faults before RESUME) few.
            "-device", "virtio-serial-pci,max_ports=3",
            "-chardev", "socket,id=ch0,path=\(agentSocket),server=on,wait=off",
            "-device", "virtserialport,chardev=ch0,name=\(Self.agentPortName)",
            "-chardev", "file,id=ch1,path=\(portLog)",
            "-device", "virtserialport,chardev=ch1,name=\(Self.logPortName)",
            "-qmp", "unix:\(qmpSocket),server=on,wait=off",
            "-pidfile", pidFile,
        ]
        if let disk { args += ["-drive", "file=\(disk),if=virtio,format=qcow2"] }
        if !forwards.isEmpty {
            let rules = forwards.map { "hostfwd=tcp:\(forwardHost):\($0)-:\($0)" }.joined(separator: ",")
            args += ["-netdev", "user,id=n0,\(rules)", "-device", "virtio-net-pci,netdev=n0"]
        }
        if incoming { args += ["-incoming", "defer"] }
        return args + extraArgs
    }

    /// Rejects what QEMU would misread or refuse later with a less clear message.
    public func validate() throws(QEMUError) {
        func fail(_ why: String) -> QEMUError { .invalidConfig("\(name): \(why)") }
        guard !name.isEmpty else { throw .invalidConfig("the VM needs a name") }
        guard memoryMiB > 0 else { throw fail("memoryMiB must be positive, not \(memoryMiB)") }
        guard ramPadKiB >= 0, ramPadKiB % 8 == 0, ramPadKiB < 1024 else {
            throw fail("ramPadKiB must be a multiple of 8 below 1024, not \(ramPadKiB)")
        }
        guard vcpus > 0 else { throw fail("vcpus must be positive, not \(vcpus)") }
        guard accel == "tcg" || accel == "kvm" else { throw fail("accel must be \"tcg\" or \"kvm\", not \"\(accel)\"") }
        guard deadlineSeconds > 0 else { throw fail("deadlineSeconds must be positive") }
        if kernel == nil, initrd != nil || append != nil { throw fail("initrd and append need a kernel") }
        // These paths sit inside QEMU's comma-separated option strings, where a comma starts a new option.
        for (what, path) in [("ramFile", ramFile), ("qmpSocket", qmpSocket), ("serialLog", serialLog),
                             ("agentSocket", agentSocket), ("portLog", portLog)] {
            guard !path.isEmpty, !path.contains(",") else { throw fail("\(what) \"\(path)\" is empty or has a comma") }
        }
        if let disk, disk.isEmpty || disk.contains(",") { throw fail("disk \"\(disk)\" is empty or has a comma") }
        guard Set(forwards).count == forwards.count, !forwards.contains(0) else {
            throw fail("forwarded ports must be distinct and non-zero: \(forwards)")
        }
        guard Endpoint("\(forwardHost):1") != nil else { throw fail("forwardHost \"\(forwardHost)\" is not an IPv4 address") }
        for (what, path) in [("qmpSocket", qmpSocket), ("agentSocket", agentSocket)] {
            guard path.utf8.count < 108 else { throw fail("\(what) \"\(path)\" is longer than a unix socket path can be") }
        }
    }

    /// The QEMU binary to run.
    public func resolveExecutable(environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(QEMUError) -> String
    {
        let wanted = qemuPath ?? environment["EPCOPY_QEMU"] ?? "qemu-system-x86_64"
        guard let path = HostProbe.findExecutable(wanted, pathVariable: environment["PATH"]) else {
            throw .notFound("\(wanted) is not installed or not executable (apt-get install qemu-system-x86,"
                + " or set EPCOPY_QEMU)")
        }
        return path
    }
}

// `epcopy probe`: what this host offers, tested rather than assumed (QEMU's
// postcopy_ram_supported_by_host does the same). Each capability is exercised for real — a uffd is
// opened both ways, a shmem range is registered, an io_uring is set up — so a "yes" here means the
// engine's path works, and a "no" carries the error that explains why. Tests skip on these reasons.

import CEpcopyLinux
import CNuma
import CURing
import CVirt
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The probe's findings. The JSON keys (`CodingKeys`) are a stable contract for scripts and tests.
public struct HostProbeReport: Codable, Sendable, Equatable {
    public struct Outcome: Codable, Sendable, Equatable {
        public var ok: Bool
        public var error: String?
        public init(ok: Bool, error: String? = nil) { self.ok = ok; self.error = error }
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(ok, forKey: .ok)
            try c.encode(error, forKey: .error)
        }
        enum CodingKeys: String, CodingKey { case ok, error }
        static func from(_ result: Result<Void, SyscallError>) -> Outcome {
            switch result {
            case .success: return Outcome(ok: true)
            case .failure(let e): return Outcome(ok: false, error: e.description)
            }
        }
    }

    public var kernel: String
    /// True when at least one way of opening a userfaultfd works.
    public var userfaultfd: Bool
    public var userfaultfdSyscall: Outcome
    public var userfaultfdDevice: Outcome
    public var uffdFeaturesRaw: UInt64
    public var uffdFeatures: [String: Bool]
    /// A MAP_SHARED memfd range registered in MISSING mode: what the destination does to QEMU's RAM.
    public var shmemMissing: Bool
    public var shmemMissingIoctls: [String]
    public var shmemMissingError: String?
    public var shmemMinor: Bool
    public var shmemWP: Bool
    public var ioUring: Bool
    public var ioUringError: String?
    public var ioUringOpcodes: [String]
    public var qemu: String?
    public var qemuPath: String?
    /// "kvm", "tcg", or "none" (no QEMU).
    public var accel: String
    public var accelReason: String
    public var kvmDevice: Bool
    public var numaAvailable: Bool
    public var numaNodes: Int
    public var libvirt: String?
    /// Each NUMA node's CPUs and memory (sysfs), empty when the tree cannot be read.
    public var numaTopology: [NumaNode] = []
    /// The libvirt daemon at `libvirtURI`: its version when it answers, nil when not asked.
    public var libvirtURI: String? = nil
    public var libvirtDaemon: Outcome? = nil
    public var libvirtDaemonVersion: String? = nil

    enum CodingKeys: String, CodingKey {
        case kernel, userfaultfd
        case userfaultfdSyscall = "userfaultfd_syscall"
        case userfaultfdDevice = "userfaultfd_device"
        case uffdFeaturesRaw = "uffd_features_raw"
        case uffdFeatures = "uffd_features"
        case shmemMissing = "shmem_missing"
        case shmemMissingIoctls = "shmem_missing_ioctls"
        case shmemMissingError = "shmem_missing_error"
        case shmemMinor = "shmem_minor"
        case shmemWP = "shmem_wp"
        case ioUring = "io_uring"
        case ioUringError = "io_uring_error"
        case ioUringOpcodes = "io_uring_opcodes"
        case qemu
        case qemuPath = "qemu_path"
        case accel
        case accelReason = "accel_reason"
        case kvmDevice = "kvm_device"
        case numaAvailable = "numa_available"
        case numaNodes = "numa_nodes"
        case libvirt
        case numaTopology = "numa_topology"
        case libvirtURI = "libvirt_uri"
        case libvirtDaemon = "libvirt_daemon"
        case libvirtDaemonVersion = "libvirt_daemon_version"
    }

    /// Absent values are written as `null`, never left out: every key is always there for scripts.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(kernel, forKey: .kernel)
        try c.encode(userfaultfd, forKey: .userfaultfd)
        try c.encode(userfaultfdSyscall, forKey: .userfaultfdSyscall)
        try c.encode(userfaultfdDevice, forKey: .userfaultfdDevice)
        try c.encode(uffdFeaturesRaw, forKey: .uffdFeaturesRaw)
        try c.encode(uffdFeatures, forKey: .uffdFeatures)
        try c.encode(shmemMissing, forKey: .shmemMissing)
        try c.encode(shmemMissingIoctls, forKey: .shmemMissingIoctls)
        try c.encode(shmemMissingError, forKey: .shmemMissingError)
        try c.encode(shmemMinor, forKey: .shmemMinor)
        try c.encode(shmemWP, forKey: .shmemWP)
        try c.encode(ioUring, forKey: .ioUring)
        try c.encode(ioUringError, forKey: .ioUringError)
        try c.encode(ioUringOpcodes, forKey: .ioUringOpcodes)
        try c.encode(qemu, forKey: .qemu)
        try c.encode(qemuPath, forKey: .qemuPath)
        try c.encode(accel, forKey: .accel)
        try c.encode(accelReason, forKey: .accelReason)
        try c.encode(kvmDevice, forKey: .kvmDevice)
        try c.encode(numaAvailable, forKey: .numaAvailable)
        try c.encode(numaNodes, forKey: .numaNodes)
        try c.encode(libvirt, forKey: .libvirt)
        try c.encode(numaTopology, forKey: .numaTopology)
        try c.encode(libvirtURI, forKey: .libvirtURI)
        try c.encode(libvirtDaemon, forKey: .libvirtDaemon)
        try c.encode(libvirtDaemonVersion, forKey: .libvirtDaemonVersion)
    }
}

public enum HostProbe {
    /// Runs every check. Never throws: a failing capability is a finding, not an error.
    /// With `libvirtURI`, also whether a libvirt daemon answers there.
    public static func run(environment: [String: String] = ProcessInfo.processInfo.environment,
                           libvirtURI: String? = nil) -> HostProbeReport {
        let syscallPath = Result<Void, SyscallError> { () throws(SyscallError) in
            _ = try Userfaultfd(path: .syscall)
        }
        let devicePath = Result<Void, SyscallError> { () throws(SyscallError) in
            _ = try Userfaultfd(path: .device)
        }
        let path: UffdOpenPath = (try? devicePath.get()) != nil ? .device : .syscall
        let features = (try? Userfaultfd.availableFeatures(path: path)) ?? []

        let missing = registerShmem(path: path, mode: .missing, features: [.missingShmem])
        let minor = registerShmem(path: path, mode: .minor, features: [.minorShmem])
        let wp = registerShmem(path: path, mode: .writeProtect, features: [.pagefaultFlagWP, .wpHugetlbfsShmem])
        let uring = probeIoUring()
        let qemu = probeQEMU(environment: environment)
        let kvm = kvmDeviceUsable()
        let (accel, reason) = chooseAccel(qemuPresent: qemu.version != nil, kvmDevice: kvm, environment: environment)
        let numaOK = numa_available() >= 0

        var report = HostProbeReport(
            kernel: kernelRelease(),
            userfaultfd: (try? syscallPath.get()) != nil || (try? devicePath.get()) != nil,
            userfaultfdSyscall: .from(syscallPath),
            userfaultfdDevice: .from(devicePath),
            uffdFeaturesRaw: features.rawValue,
            uffdFeatures: Dictionary(uniqueKeysWithValues: UffdFeatures.named.map { ($0.0, features.contains($0.1)) }),
            shmemMissing: missing.ioctls != nil,
            shmemMissingIoctls: missing.ioctls?.names ?? [],
            shmemMissingError: missing.error,
            shmemMinor: minor.ioctls != nil,
            shmemWP: wp.ioctls != nil,
            ioUring: uring.error == nil,
            ioUringError: uring.error,
            ioUringOpcodes: uring.opcodes,
            qemu: qemu.version,
            qemuPath: qemu.path,
            accel: accel,
            accelReason: reason,
            kvmDevice: kvm,
            numaAvailable: numaOK,
            numaNodes: numaOK ? Int(numa_num_configured_nodes()) : 1,
            libvirt: libvirtVersion()
        )
        report.numaTopology = (try? NumaTopology.read())?.nodes ?? []
        if let libvirtURI {
            report.libvirtURI = libvirtURI
            do {
                report.libvirtDaemonVersion = try LibvirtConnection(uri: libvirtURI).libvirtVersion()
                report.libvirtDaemon = HostProbeReport.Outcome(ok: true, error: nil)
            } catch { report.libvirtDaemon = HostProbeReport.Outcome(ok: false, error: "\(error)") }
        }
        return report
    }

    static func kernelRelease() -> String {
        var name = utsname()
        guard uname(&name) == 0 else { return "unknown" }
        return withUnsafeBytes(of: &name.release) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// Registers a 2 MiB MAP_SHARED memfd range with a fresh uffd, exactly as the destination will
    /// register QEMU's RAM file mapping; returns the ioctls the kernel allows on it, or the error.
    static func registerShmem(path: UffdOpenPath, mode: UffdRegisterMode,
                              features: UffdFeatures) -> (ioctls: UffdIoctls?, error: String?) {
        do throws(SyscallError) {
            let length = 2 << 20
            let file = try FileDescriptor.memfd(name: "epcopy-probe")
            try file.truncate(to: UInt64(length))
            let mapping = try MemoryMapping(file: file, length: length)
            let uffd = try Userfaultfd(path: path, features: features)
            guard uffd.features.isSuperset(of: features) else {
                return (nil, "UFFDIO_API did not grant the features this mode needs")
            }
            let ioctls = try uffd.register(start: mapping.address, length: length, mode: mode)
            try uffd.unregister(start: mapping.address, length: length)
            return (ioctls, nil)
        } catch {
            return (nil, error.description)
        }
    }

    /// Sets up a real ring (io_uring can be disabled by sysctl or seccomp even when the kernel has it)
    /// and lists the opcodes the kernel's IORING_REGISTER_PROBE reports.
    static func probeIoUring() -> (error: String?, opcodes: [String]) {
        var ring = io_uring()
        let rc = io_uring_queue_init(8, &ring, 0)
        guard rc == 0 else {
            return (SyscallError(call: "io_uring_setup", errno: -rc).description, [])
        }
        defer { io_uring_queue_exit(&ring) }
        guard let probe = io_uring_get_probe_ring(&ring) else {
            return ("IORING_REGISTER_PROBE failed", [])
        }
        defer { io_uring_free_probe(probe) }
        let last = Int(probe.pointee.last_op)
        var names: [String] = []
        for op in 0...last where io_uring_opcode_supported(probe, Int32(op)) != 0 {
            names.append(op < ioUringOpcodeNames.count ? ioUringOpcodeNames[op] : "OP_\(op)")
        }
        return (nil, names)
    }

    /// Kernel opcode numbers 0...61 in UAPI order; newer ones print as OP_N.
    static let ioUringOpcodeNames = [
        "NOP", "READV", "WRITEV", "FSYNC", "READ_FIXED", "WRITE_FIXED", "POLL_ADD", "POLL_REMOVE",
        "SYNC_FILE_RANGE", "SENDMSG", "RECVMSG", "TIMEOUT", "TIMEOUT_REMOVE", "ACCEPT", "ASYNC_CANCEL",
        "LINK_TIMEOUT", "CONNECT", "FALLOCATE", "OPENAT", "CLOSE", "FILES_UPDATE", "STATX", "READ", "WRITE",
        "FADVISE", "MADVISE", "SEND", "RECV", "OPENAT2", "EPOLL_CTL", "SPLICE", "PROVIDE_BUFFERS",
        "REMOVE_BUFFERS", "TEE", "SHUTDOWN", "RENAMEAT", "UNLINKAT", "MKDIRAT", "SYMLINKAT", "LINKAT",
        "MSG_RING", "FSETXATTR", "SETXATTR", "FGETXATTR", "GETXATTR", "SOCKET", "URING_CMD", "SEND_ZC",
        "SENDMSG_ZC", "READ_MULTISHOT", "WAITID", "FUTEX_WAIT", "FUTEX_WAKE", "FUTEX_WAITV",
        "FIXED_FD_INSTALL", "FTRUNCATE", "BIND", "LISTEN", "RECV_ZC", "EPOLL_WAIT", "READV_FIXED",
        "WRITEV_FIXED",
    ]

    /// Finds qemu-system-x86_64 on PATH (or EPCOPY_QEMU) and reads its version line.
    static func probeQEMU(environment: [String: String]) -> (version: String?, path: String?) {
        guard let path = findExecutable(environment["EPCOPY_QEMU"] ?? "qemu-system-x86_64",
                                        pathVariable: environment["PATH"]) else { return (nil, nil) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = ["--version"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return (nil, path) }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        // "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"
        let version = text.split(separator: "\n").first.flatMap { line -> String? in
            guard let r = line.range(of: "version ") else { return nil }
            return line[r.upperBound...].split(separator: " ").first.map(String.init)
        }
        return (version, path)
    }

    static func findExecutable(_ name: String, pathVariable: String?) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        for dir in (pathVariable ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// /dev/kvm opens and answers KVM_GET_API_VERSION (12). This alone does not mean guests boot:
    /// on hosts that are themselves VMs (PVM) the device exists and answers, but normal guests hang.
    static func kvmDeviceUsable() -> Bool {
        let fd = Glibc.open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        let kvmGetAPIVersion: UInt = 0xAE00  // _IO(KVMIO, 0x00)
        return epc_ioctl_ptr(fd, kvmGetAPIVersion, nil) == 12
    }

    /// TCG unless KVM is known to run guests here. Nothing in this probe can know that without booting
    /// one, so KVM is chosen only when the operator says so (EPCOPY_ACCEL=kvm) and the device answers.
    static func chooseAccel(qemuPresent: Bool, kvmDevice: Bool,
                            environment: [String: String]) -> (String, String) {
        guard qemuPresent else { return ("none", "qemu-system-x86_64 is not installed") }
        switch environment["EPCOPY_ACCEL"] {
        case "kvm" where kvmDevice:
            return ("kvm", "EPCOPY_ACCEL=kvm and /dev/kvm answers")
        case "kvm":
            return ("tcg", "EPCOPY_ACCEL=kvm but /dev/kvm is not usable; falling back to TCG")
        case "tcg":
            return ("tcg", "EPCOPY_ACCEL=tcg")
        default:
            return ("tcg", kvmDevice
                ? "/dev/kvm answers, but a KVM guest is not known to boot here; set EPCOPY_ACCEL=kvm if it does"
                : "/dev/kvm is not usable")
        }
    }

    static func libvirtVersion() -> String? {
        var version: UInt = 0
        guard virGetVersion(&version, nil, nil) == 0 else { return nil }
        return "\(version / 1_000_000).\(version / 1000 % 1000).\(version % 1000)"
    }
}

// Starting and stopping the QEMUs a migration moves between. The command line is fixed (DESIGN):
// guest RAM is a shared file under /dev/shm (what the uffd hand-over and x-ignore-shared need), the
// agent talks over a virtio-serial port, QMP is a unix socket. A QEMU that epcopy started must never
// outlive its purpose: a watchdog thread spawns it, reaps it, and SIGKILLs it when its deadline
// passes; the process also gets a parent-death signal tied to that thread (via setpriv), so even a
// crashed epcopy leaves no QEMU behind; and teardown removes the files QEMU left in place.

import CEpcopyLinux
import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Configuration

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

// MARK: - Errors and outcomes

/// How a QEMU process ended.
public enum QEMUTermination: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    /// The shell's convention: the exit code, or 128 + the signal.
    public var status: Int32 {
        switch self {
        case .exited(let code): return code
        case .signaled(let signal): return 128 + signal
        }
    }

    public var description: String {
        switch self {
        case .exited(let code): return "exited with status \(code)"
        case .signaled(let signal): return "killed by signal \(signal)"
        }
    }
}

/// Why a QEMU could not be started.
public enum QEMUError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidConfig(String)
    case notFound(String)
    /// posix_spawn itself failed.
    case spawnFailed(SyscallError)
    /// QEMU ended before its monitor answered (a bad argument, a missing file); `stderr` is what it said.
    case exitedEarly(status: Int32, stderr: String)
    /// QEMU runs but its monitor did not answer properly; QEMU was killed.
    case qmp(QMPError)

    public var description: String {
        switch self {
        case .invalidConfig(let why):
            return "QEMU config: \(why)"
        case .notFound(let why):
            return "QEMU launch: \(why)"
        case .spawnFailed(let error):
            return "QEMU launch: \(error)"
        case .exitedEarly(let status, let stderr):
            let text = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            return "QEMU launch: QEMU exited with status \(status): \(text.isEmpty ? "(no message)" : text)"
        case .qmp(let error):
            return "QEMU launch: \(error)"
        }
    }
}

// MARK: - Process

/// A running QEMU started from a `QEMUConfig`, with its QMP connection. Dropping it kills QEMU,
/// reaps it and removes its files (see `teardown`).
public final class QEMUProcess: @unchecked Sendable {
    // SAFETY: the lets are set in init; the mutable flags live in `Mutex`es; the supervisor is
    // thread-safe.
    public let config: QEMUConfig
    /// The binary that runs (after setpriv execs it, the PID is QEMU's).
    public let executable: String
    public let pid: Int32
    /// Connected and past capabilities negotiation.
    public let qmp: QMPClient
    private let supervisor: QEMUSupervisor
    private let ramFileExisted: Bool
    private let keepRAM: Mutex<Bool>
    private let tornDown = Mutex<Bool>(false)

    private init(config: QEMUConfig, executable: String, supervisor: QEMUSupervisor, pid: Int32,
                 qmp: QMPClient, ramFileExisted: Bool) {
        self.config = config
        self.executable = executable
        self.supervisor = supervisor
        self.pid = pid
        self.qmp = qmp
        self.ramFileExisted = ramFileExisted
        self.keepRAM = Mutex(config.keepRAMFile)
    }

    deinit { teardown() }

    /// Spawns QEMU and connects to its monitor. Fails with `.exitedEarly` (and QEMU's stderr) when QEMU
    /// ends before its monitor answers; on every failure nothing is left running or on disk.
    public static func launch(_ config: QEMUConfig, connectTimeout: Duration) throws(QEMUError) -> QEMUProcess {
        try config.validate()
        let executable = try config.resolveExecutable()
        let ramFileExisted = access(config.ramFile, F_OK) == 0
        var environment = ProcessInfo.processInfo.environment
        environment.merge(config.environment) { _, extra in extra }
        let supervisor = QEMUSupervisor(name: config.name)
        let pid = try supervisor.spawn(executable: executable, arguments: config.arguments,
                                       environment: environment, deadlineSeconds: config.deadlineSeconds)
        Log.qemu.trace("qemu \(config.name): pid \(pid): \(executable) \(config.arguments.joined(separator: " "))")
        do throws(QMPError) {
            let qmp = try QMPClient.connect(path: config.qmpSocket, timeout: connectTimeout,
                                            abandonIf: { supervisor.termination != nil })
            return QEMUProcess(config: config, executable: executable, supervisor: supervisor, pid: pid,
                               qmp: qmp, ramFileExisted: ramFileExisted)
        } catch {
            // A QEMU that failed closes its monitor socket a moment before the reaper sees it exit.
            let ended = supervisor.waitForExit(timeout: .seconds(1))
            supervisor.stop()
            removeFiles(config, ramFileExisted: ramFileExisted, keepRAMFile: config.keepRAMFile)
            if let ended { throw .exitedEarly(status: ended.status, stderr: supervisor.stderrText) }
            throw .qmp(error)
        }
    }

    /// Whether the process has not been reaped yet.
    public var isRunning: Bool { supervisor.termination == nil }

    /// How it ended, once reaped.
    public var termination: QEMUTermination? { supervisor.termination }

    /// True when the watchdog killed QEMU because `deadlineSeconds` passed.
    public var deadlineExpired: Bool { supervisor.deadlineExpired }

    /// What QEMU wrote to stderr so far (the first 256 KiB).
    public var stderrText: String { supervisor.stderrText }

    /// The guest's serial console so far; empty when nothing was written.
    public var serialLog: String {
        (try? String(contentsOfFile: config.serialLog, encoding: .utf8)) ?? ""
    }

    /// Whether teardown leaves the RAM file; may be changed at any time before teardown (e.g. once the
    /// source is fenced and its RAM has to keep serving the destination).
    public var keepRAMFile: Bool {
        get { keepRAM.withLock { $0 } }
        set { keepRAM.withLock { $0 = newValue } }
    }

    /// SIGKILLs QEMU by PID and returns once it is reaped (at most 10 s; a process stuck in the kernel
    /// may take that long).
    public func kill() {
        supervisor.kill()
        _ = supervisor.waitForExit(timeout: .seconds(10))
    }

    /// Waits up to `timeout` for QEMU to end; nil if it still runs.
    @discardableResult
    public func waitForExit(timeout: Duration) -> QEMUTermination? {
        supervisor.waitForExit(timeout: timeout)
    }

    /// Closes QMP, kills and reaps QEMU, and removes the sockets, pidfile, serial log (unless
    /// `keepSerialLog`) and the RAM file (unless `keepRAMFile`, or it existed before launch). Idempotent.
    public func teardown() {
        let first = tornDown.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        qmp.close()
        supervisor.stop()
        Self.removeFiles(config, ramFileExisted: ramFileExisted, keepRAMFile: keepRAMFile)
    }

    private static func removeFiles(_ config: QEMUConfig, ramFileExisted: Bool, keepRAMFile: Bool) {
        var paths = [config.qmpSocket, config.agentSocket, config.pidFile]
        if !config.keepSerialLog { paths += [config.serialLog, config.portLog] }
        if !keepRAMFile && !ramFileExisted { paths.append(config.ramFile) }
        for path in paths { _ = unlink(path) }
    }
}

// MARK: - Supervisor

/// Spawns one QEMU from its own thread and stays with it: drains its stderr, reaps it, and kills it at
/// its deadline. The parent-death signal binds QEMU to this thread, which ends only after reaping.
final class QEMUSupervisor: @unchecked Sendable {
    // SAFETY: `state` is only touched with `condition` locked; `thread` is set once by spawn and joined
    // once by stop, both called by the owning QEMUProcess (or launch) only.
    private struct State {
        var pid: Int32?
        var spawnError: SyscallError?
        var termination: QEMUTermination?
        var deadlineExpired = false
        var stderr: [UInt8] = []
    }

    private static let stderrLimit = 256 << 10
    private static let setpriv = "/usr/bin/setpriv"

    private let name: String
    private let condition = NSCondition()
    private var state = State()
    private var thread: JoinableThread?

    init(name: String) { self.name = name }

    var termination: QEMUTermination? { locked { $0.termination } }
    var deadlineExpired: Bool { locked { $0.deadlineExpired } }
    var stderrText: String { locked { String(decoding: $0.stderr, as: UTF8.self) } }

    private func locked<T>(_ body: (inout State) -> T) -> T {
        condition.lock()
        defer { condition.unlock() }
        return body(&state)
    }

    /// Starts the supervising thread, which spawns QEMU; returns QEMU's PID.
    func spawn(executable: String, arguments: [String], environment: [String: String],
               deadlineSeconds: Double) throws(QEMUError) -> Int32 {
        var argv = [executable] + arguments
        // setpriv sets PR_SET_PDEATHSIG and execs QEMU in place (same PID): if this thread, or all of
        // epcopy, dies, the kernel SIGKILLs QEMU.
        if access(Self.setpriv, X_OK) == 0 {
            argv = [Self.setpriv, "--pdeathsig", "KILL", "--"] + argv
        }
        let env = environment.map { "\($0.key)=\($0.value)" }
        var fds: [Int32] = [-1, -1]
        let piped = pipe2(&fds, O_CLOEXEC)
        guard piped == 0 else { throw .spawnFailed(SyscallError(call: "pipe2", errno: errno)) }
        let deadlineNanos = monotonicNanos() + UInt64(deadlineSeconds * 1e9)
        let (fullArgv, readEnd, writeEnd) = (argv, fds[0], fds[1])
        thread = JoinableThread(name: "epcopy-qemu-wd") { [self] in
            supervise(argv: fullArgv, env: env, stderrRead: readEnd, stderrWrite: writeEnd, deadlineNanos: deadlineNanos)
        }
        // The thread reports one or the other right after posix_spawn returns.
        condition.lock()
        while state.pid == nil && state.spawnError == nil { condition.wait() }
        let (pid, error) = (state.pid, state.spawnError)
        condition.unlock()
        if let error {
            thread?.join()
            throw .spawnFailed(error)
        }
        return pid!
    }

    /// The supervising thread's body.
    private func supervise(argv: [String], env: [String], stderrRead: Int32, stderrWrite: Int32,
                           deadlineNanos: UInt64) {
        let errRead = FileDescriptor(adopting: stderrRead)
        var pid: pid_t = 0
        let rc = Self.posixSpawn(argv: argv, env: env, stderr: stderrWrite, pid: &pid)
        _ = Glibc.close(stderrWrite)
        guard rc == 0 else {
            locked { $0.spawnError = SyscallError(call: "posix_spawn(\(argv[0]))", errno: rc) }
            condition.broadcast()
            return
        }
        locked { $0.pid = pid }
        condition.broadcast()

        _ = fcntl(errRead.rawValue, F_SETFL, O_NONBLOCK)
        let pidfd = Int32(epc_pidfd_open(pid, 0))  // -errno on failure: then waitpid is polled
        defer { if pidfd >= 0 { _ = Glibc.close(pidfd) } }
        var stderrOpen = true
        while true {
            let now = monotonicNanos()
            if now >= deadlineNanos && !deadlineExpired {
                Log.qemu.trace("qemu \(name): deadline passed, SIGKILL \(pid)")
                locked { $0.deadlineExpired = true }
                kill()
            }
            // After the deadline (or without a pidfd) wake up regularly to re-check.
            var timeoutMs = now < deadlineNanos ? Int32(min((deadlineNanos - now) / 1_000_000 + 1, 1000)) : 100
            if pidfd < 0 { timeoutMs = min(timeoutMs, 20) }
            var fds = [pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: stderrOpen ? errRead.rawValue : -1, events: Int16(POLLIN), revents: 0)]
            _ = poll(&fds, 2, timeoutMs)
            if fds[1].revents != 0 { stderrOpen = drainStderr(errRead.rawValue) }
            if reap(pid) { break }
        }
        _ = drainStderr(errRead.rawValue)
    }

    /// Reads what is available; false at end of file.
    private func drainStderr(_ fd: Int32) -> Bool {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 {
                locked { s in
                    let room = Self.stderrLimit - s.stderr.count
                    if room > 0 { s.stderr.append(contentsOf: chunk[..<min(n, room)]) }
                }
                continue
            }
            if n < 0 && errno == EINTR { continue }
            return n < 0  // EAGAIN: still open; 0 or another error: done with it
        }
    }

    /// Collects the exit status if QEMU has ended. Under the lock, so `kill` never signals a reaped
    /// (and possibly reused) PID.
    private func reap(_ pid: pid_t) -> Bool {
        let ended = locked { s -> Bool in
            var status: Int32 = 0
            let rc = waitpid(pid, &status, WNOHANG)
            guard rc == pid else {
                if rc < 0 && errno == ECHILD { s.termination = .exited(-1); return true }  // reaped elsewhere
                return false
            }
            // WIFEXITED/WTERMSIG are macros Swift does not import.
            let signal = status & 0x7f
            s.termination = signal == 0 ? .exited((status >> 8) & 0xff) : .signaled(signal)
            return true
        }
        if ended {
            Log.qemu.trace("qemu \(name): \(termination.map(\.description) ?? "?")")
            condition.broadcast()
        }
        return ended
    }

    /// SIGKILL by PID, unless already reaped.
    func kill() {
        locked { s in
            if let pid = s.pid, s.termination == nil { _ = Glibc.kill(pid, SIGKILL) }
        }
    }

    func waitForExit(timeout: Duration) -> QEMUTermination? {
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        condition.lock()
        defer { condition.unlock() }
        while state.termination == nil {
            let now = monotonicNanos()
            guard now < deadline else { return nil }
            _ = condition.wait(until: Date(timeIntervalSinceNow: min(Double(deadline - now) / 1e9, 1)))
        }
        return state.termination
    }

    /// Kills, waits for the reap, joins the thread. If the process cannot be reaped within 10 s the
    /// thread is left to finish on its own rather than blocking the caller.
    func stop() {
        kill()
        if waitForExit(timeout: .seconds(10)) != nil {
            thread?.join()
        }
    }

    private static func posixSpawn(argv: [String], env: [String], stderr: Int32, pid: inout pid_t) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Threads of epcopy may block signals or ignore SIGPIPE; QEMU starts with the defaults.
        var mask = sigset_t()
        sigemptyset(&mask)
        posix_spawnattr_setsigmask(&attr, &mask)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGUSR1, SIGUSR2] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let cArgv = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup($0) } + [nil]
        defer {
            cArgv.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        return posix_spawn(&pid, argv[0], &actions, &attr, cArgv, cEnv)
    }
}

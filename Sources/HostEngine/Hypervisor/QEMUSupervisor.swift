// The thread that owns one QEMU process: spawns it (bound to this thread by a parent-death signal),
// drains its stderr, reaps it, and SIGKILLs it when its deadline passes, so no QEMU outlives its purpose.
// A QEMU that must outlive epcopy (a destination whose daemon may die and be restarted) is bound instead to
// a keeper, timeout(1), that holds the deadline; a restarted daemon adopts it by PID and watches its pidfd.

import CEpcopyLinux
import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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
        /// QEMU's own pidfd when it is not the child this thread spawned (behind a keeper, or adopted).
        var qemuPidfd: Int32 = -1
        var killed = false
        /// Not this process's child: signalled and watched only through `qemuPidfd`.
        var adopted = false
        /// Another manager (libvirt) owns the process: it is watched, never signalled (see `watchManaged`).
        var managed = false
        /// The watch of an adopted or managed process is over (`stop`), though the process may run on.
        var unwatched = false
    }

    private static let stderrLimit = 256 << 10
    private static let setpriv = "/usr/bin/setpriv"
    private static let keeper = "/usr/bin/timeout"

    private let name: String
    /// QEMU's stderr when it goes to a file (it outlives epcopy) rather than to a pipe this thread drains.
    private let stderrLog: String?
    private let condition = NSCondition()
    private var state = State()
    private var thread: JoinableThread?

    /// `stderrLog`: QEMU outlives epcopy (see spawn), its stderr goes to this file.
    init(name: String, stderrLog: String? = nil) {
        self.name = name
        self.stderrLog = stderrLog
    }

    deinit { if state.qemuPidfd >= 0 { _ = Glibc.close(state.qemuPidfd) } }

    var termination: QEMUTermination? { locked { $0.termination } }
    var deadlineExpired: Bool { locked { $0.deadlineExpired } }
    var stderrText: String {
        if let stderrLog, let file = FileHandle(forReadingAtPath: stderrLog) {
            defer { try? file.close() }
            return String(decoding: (try? file.read(upToCount: Self.stderrLimit)) ?? Data(), as: UTF8.self)
        }
        return locked { String(decoding: $0.stderr, as: UTF8.self) }
    }

    private func locked<T>(_ body: (inout State) -> T) -> T {
        condition.lock()
        defer { condition.unlock() }
        return body(&state)
    }

    /// Starts the supervising thread, which spawns QEMU; returns the PID of the child: QEMU itself, or (with a
    /// `stderrLog`) its keeper, whose child QEMU is (see `bindQEMU`).
    func spawn(executable: String, arguments: [String], environment: [String: String],
               deadlineSeconds: Double) throws(QEMUError) -> Int32 {
        var argv = [executable] + arguments
        // setpriv sets PR_SET_PDEATHSIG and execs QEMU in place (same PID): if its parent dies, the kernel
        // SIGKILLs QEMU. The parent is this thread, or the keeper: timeout(1), which kills QEMU at the deadline
        // whether or not epcopy still lives, and (not bound to epcopy) lets QEMU survive epcopy's death.
        if access(Self.setpriv, X_OK) == 0 {
            argv = [Self.setpriv, "--pdeathsig", "KILL", "--"] + argv
        }
        if stderrLog != nil {
            argv = [Self.keeper, "--signal=KILL", "\(Int(deadlineSeconds.rounded(.up)))s"] + argv
        }
        let env = environment.map { "\($0.key)=\($0.value)" }
        var fds: [Int32] = [-1, -1]
        if let stderrLog {
            // No pipe: a file QEMU can keep writing after epcopy is gone.
            let fd = open(stderrLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw .spawnFailed(SyscallError(call: "open(\(stderrLog))", errno: errno)) }
            fds[1] = fd
        } else {
            let piped = pipe2(&fds, O_CLOEXEC)
            guard piped == 0 else { throw .spawnFailed(SyscallError(call: "pipe2", errno: errno)) }
        }
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
        // -1 when stderr goes to a file instead of the pipe.
        let errRead = stderrRead
        defer { if errRead >= 0 { _ = Glibc.close(errRead) } }
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

        if errRead >= 0 { _ = fcntl(errRead, F_SETFL, O_NONBLOCK) }
        let pidfd = Int32(epc_pidfd_open(pid, 0))  // -errno on failure: then waitpid is polled
        defer { if pidfd >= 0 { _ = Glibc.close(pidfd) } }
        var stderrOpen = errRead >= 0
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
                       pollfd(fd: stderrOpen ? errRead : -1, events: Int16(POLLIN), revents: 0)]
            _ = poll(&fds, 2, timeoutMs)
            if fds[1].revents != 0 { stderrOpen = drainStderr(errRead) }
            if reap(pid) { break }
        }
        if errRead >= 0 { _ = drainStderr(errRead) }
    }

    /// QEMU's own PID, when the spawned child is its keeper: `kill` then signals QEMU itself too (through a
    /// pidfd, so never a reused PID), in case no parent-death signal binds it to the keeper.
    func bindQEMU(pid: Int32) {
        let pidfd = Int32(epc_pidfd_open(pid, 0))
        guard pidfd >= 0 else { return }
        locked { s in
            if s.qemuPidfd >= 0 { _ = Glibc.close(s.qemuPidfd) }
            s.qemuPidfd = pidfd
        }
    }

    /// Watches a QEMU that is not this process's child (a previous daemon started it behind its keeper): it
    /// ends when its pidfd says so; its exit status cannot be known.
    static func adopt(name: String, qemuPid: Int32, stderrLog: String?) throws(QEMUError) -> QEMUSupervisor {
        try watch(name: name, qemuPid: qemuPid, stderrLog: stderrLog, managed: false)
    }

    /// Watches a QEMU that another manager (libvirt) started and will stop: its end is seen through its pidfd, and
    /// `kill` and `stop` never signal it.
    static func watchManaged(name: String, qemuPid: Int32) throws(QEMUError) -> QEMUSupervisor {
        try watch(name: name, qemuPid: qemuPid, stderrLog: nil, managed: true)
    }

    private static func watch(name: String, qemuPid: Int32, stderrLog: String?,
                              managed: Bool) throws(QEMUError) -> QEMUSupervisor {
        let supervisor = QEMUSupervisor(name: name, stderrLog: stderrLog)
        let pidfd = Int32(epc_pidfd_open(qemuPid, 0))
        guard pidfd >= 0 else { throw .notFound("QEMU pid \(qemuPid) is gone: \(SyscallError(call: "pidfd_open", errno: -pidfd))") }
        supervisor.state.qemuPidfd = pidfd
        supervisor.state.pid = qemuPid
        supervisor.state.adopted = true
        supervisor.state.managed = managed
        supervisor.thread = JoinableThread(name: "epcopy-qemu-wd") { [supervisor] in supervisor.watchAdopted(pidfd) }
        return supervisor
    }

    private func watchAdopted(_ pidfd: Int32) {
        while true {
            var fds = [pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, 1, 200) > 0, fds[0].revents != 0 { break }
            if locked({ $0.unwatched }) { return }
        }
        locked { $0.termination = $0.killed ? .signaled(SIGKILL) : .ended }
        Log.qemu.trace("qemu \(name): \(termination.map(\.description) ?? "?")")
        condition.broadcast()
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

    /// SIGKILL by PID (QEMU's pidfd when it is not the child), unless already reaped.
    func kill() {
        locked { s in
            guard s.termination == nil, !s.managed else { return }
            s.killed = true
            if s.qemuPidfd >= 0 { _ = epc_pidfd_send_signal(s.qemuPidfd, SIGKILL) }
            // The child itself by PID: it is not reaped yet, so the PID is still its own.
            if let pid = s.pid, !s.adopted { _ = Glibc.kill(pid, SIGKILL) }
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
    /// thread is left to finish on its own rather than blocking the caller. A managed process is left
    /// running: only the watch ends.
    func stop() {
        if locked({ s -> Bool in
            s.unwatched = s.managed
            return s.managed
        }) {
            thread?.join()
            return
        }
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

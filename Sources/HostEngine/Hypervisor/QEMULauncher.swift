// Starting and stopping the QEMUs a migration moves between: QEMUProcess launches one from its
// QEMUConfig, connects its QMP monitor, and on teardown stops it and removes the files it left in place.
// A QEMU that epcopy started must never outlive its purpose: its QEMUSupervisor kills it at its deadline,
// and a parent-death signal tied to that thread (via setpriv) means even a crashed epcopy leaves none behind.

import CEpcopyLinux
import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Errors and outcomes

/// How a QEMU process ended.
public enum QEMUTermination: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)
    /// Ended, but it was not epcopy's child (adopted after a restart), so its exit status is unknowable.
    case ended

    /// The shell's convention: the exit code, or 128 + the signal.
    public var status: Int32 {
        switch self {
        case .exited(let code): return code
        case .signaled(let signal): return 128 + signal
        case .ended: return -1
        }
    }

    public var description: String {
        switch self {
        case .exited(let code): return "exited with status \(code)"
        case .signaled(let signal): return "killed by signal \(signal)"
        case .ended: return "ended (an adopted process: no exit status)"
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
    /// The keeper QEMU runs under when it outlives epcopy (`config.outlivesEpcopy`; nil when adopted).
    public let keeperPid: Int32?
    /// Connected and past capabilities negotiation.
    public let qmp: QMPClient
    private let supervisor: QEMUSupervisor
    private let ramFileExisted: Bool
    /// Started and stopped by another manager (libvirt): `kill` and `teardown` leave the process and its files.
    public let managed: Bool
    private let keepRAM: Mutex<Bool>
    private let tornDown = Mutex<Bool>(false)

    private init(config: QEMUConfig, executable: String, supervisor: QEMUSupervisor, pid: Int32, keeperPid: Int32?,
                 qmp: QMPClient, ramFileExisted: Bool, managed: Bool = false) {
        self.managed = managed
        self.config = config
        self.executable = executable
        self.supervisor = supervisor
        self.pid = pid
        self.keeperPid = keeperPid
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
        let supervisor = QEMUSupervisor(name: config.name, stderrLog: config.outlivesEpcopy ? config.stderrLog : nil)
        let pid = try supervisor.spawn(executable: executable, arguments: config.arguments,
                                       environment: environment, deadlineSeconds: config.deadlineSeconds)
        Log.qemu.trace("qemu \(config.name): pid \(pid): \(executable) \(config.arguments.joined(separator: " "))")
        do throws(QMPError) {
            let qmp = try QMPClient.connect(path: config.qmpSocket, timeout: connectTimeout,
                                            abandonIf: { supervisor.termination != nil })
            guard config.outlivesEpcopy else {
                return QEMUProcess(config: config, executable: executable, supervisor: supervisor, pid: pid,
                                   keeperPid: nil, qmp: qmp, ramFileExisted: ramFileExisted)
            }
            // Behind its keeper: QEMU wrote its own PID (-pidfile) before it served QMP.
            guard let qemuPid = Self.pidFromFile(config.pidFile), Self.parent(of: qemuPid) == pid else {
                qmp.close()
                throw QMPError.malformed(step: "pidfile", detail: "QEMU behind keeper \(pid) did not write its PID to \(config.pidFile)")
            }
            supervisor.bindQEMU(pid: qemuPid)
            return QEMUProcess(config: config, executable: executable, supervisor: supervisor, pid: qemuPid,
                               keeperPid: pid, qmp: qmp, ramFileExisted: ramFileExisted)
        } catch {
            // A QEMU that failed closes its monitor socket a moment before the reaper sees it exit.
            let ended = supervisor.waitForExit(timeout: .seconds(1))
            supervisor.stop()
            removeFiles(config, ramFileExisted: ramFileExisted, keepRAMFile: config.keepRAMFile)
            if let ended { throw .exitedEarly(status: ended.status, stderr: supervisor.stderrText) }
            throw .qmp(error)
        }
    }

    /// Takes charge of a QEMU that a previous epcopy process started with `config` (`outlivesEpcopy`) and that
    /// still runs: checks that `qemuPid` is that QEMU (its command line names the config's QMP socket), watches it
    /// through a pidfd and connects its monitor. Teardown kills it and removes its files, as if launched here.
    public static func adopt(_ config: QEMUConfig, qemuPid: Int32, connectTimeout: Duration) throws(QEMUError) -> QEMUProcess {
        let cmdline = try checkAdoptable(config, qemuPid: qemuPid)
        let supervisor = try QEMUSupervisor.adopt(name: config.name, qemuPid: qemuPid, stderrLog: config.stderrLog)
        do throws(QMPError) {
            let qmp = try QMPClient.connect(path: config.qmpSocket, timeout: connectTimeout,
                                            abandonIf: { supervisor.termination != nil })
            return QEMUProcess(config: config, executable: cmdline.first ?? "?", supervisor: supervisor, pid: qemuPid,
                               keeperPid: nil, qmp: qmp, ramFileExisted: false)
        } catch {
            supervisor.stop()
            throw .qmp(error)
        }
    }

    /// Attaches to a QEMU that another manager (libvirt) started and will stop, through an extra monitor of its own
    /// (`config.qmpSocket`): watched through a pidfd, its monitor spoken to, but `kill` and `teardown` never end it
    /// or remove its files. `config` describes it as far as epcopy needs (name, RAM file and size, serial log,
    /// agent socket).
    public static func attach(managed config: QEMUConfig, qemuPid: Int32, connectTimeout: Duration) throws(QEMUError) -> QEMUProcess {
        let cmdline = try checkAdoptable(config, qemuPid: qemuPid)
        let supervisor = try QEMUSupervisor.watchManaged(name: config.name, qemuPid: qemuPid)
        do throws(QMPError) {
            let qmp = try QMPClient.connect(path: config.qmpSocket, timeout: connectTimeout,
                                            abandonIf: { supervisor.termination != nil })
            return QEMUProcess(config: config, executable: cmdline.first ?? "?", supervisor: supervisor, pid: qemuPid,
                               keeperPid: nil, qmp: qmp, ramFileExisted: true, managed: true)
        } catch {
            supervisor.stop()
            throw .qmp(error)
        }
    }

    /// The command line of `qemuPid`, if it is the QEMU `config` describes (its QMP socket is on it).
    @discardableResult
    public static func checkAdoptable(_ config: QEMUConfig, qemuPid: Int32) throws(QEMUError) -> [String] {
        let cmdline = (FileManager.default.contents(atPath: "/proc/\(qemuPid)/cmdline")).map {
            String(decoding: $0, as: UTF8.self).split(separator: "\0").map(String.init)
        } ?? []
        guard cmdline.contains(where: { $0.contains(config.qmpSocket) }) else {
            throw .notFound("pid \(qemuPid) is not the QEMU of \(config.name) (no \(config.qmpSocket) on its command line)")
        }
        return cmdline
    }

    private static func pidFromFile(_ path: String) -> Int32? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        return Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// The parent PID of `pid` (/proc/PID/status), if it still runs.
    static func parent(of pid: Int32) -> Int32? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("PPid:") {
            return Int32(line.dropFirst(5).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// QMP's run state ("running", "paused", "postmigrate", ...), or nil when QMP does not answer within 5 s.
    public var runState: String? {
        (try? qmp.execute("query-status", timeout: .seconds(5)))?["status"]?.stringValue
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
    /// may take that long). A managed QEMU is not epcopy's to kill: nothing happens.
    public func kill() {
        guard !managed else { return }
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
    /// A managed QEMU only loses epcopy's monitor connection and watch.
    public func teardown() {
        let first = tornDown.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        qmp.close()
        supervisor.stop()
        if managed { return }
        Self.removeFiles(config, ramFileExisted: ramFileExisted, keepRAMFile: keepRAMFile)
    }

    private static func removeFiles(_ config: QEMUConfig, ramFileExisted: Bool, keepRAMFile: Bool) {
        var paths = [config.qmpSocket, config.agentSocket, config.pidFile, config.stderrLog]
        if !config.keepSerialLog { paths += [config.serialLog, config.portLog] }
        if !keepRAMFile && !ramFileExisted { paths.append(config.ramFile) }
        for path in paths { _ = unlink(path) }
    }
}

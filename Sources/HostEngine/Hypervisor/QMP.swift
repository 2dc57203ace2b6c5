// The QEMU Machine Protocol, as epcopy drives a migration with it: commands (migrate-incoming,
// migrate, migrate-continue, cont) and, just as important, the events that say when each side stopped
// and resumed. A downtime is measured between two events from two QEMUs, so every event is stamped
// with the local monotonic clock the moment its bytes arrive, next to QEMU's own wall-clock stamp.
// One reader thread per connection reads lines and sorts them into replies (matched by `id`) and
// events; callers wait on those with explicit deadlines, so no QMP call can hang epcopy.

import CEpcopyLinux
import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Events and errors

/// One asynchronous QMP event ("STOP", "RESUME", "MIGRATION", ...).
public struct QMPEvent: Sendable, Hashable {
    public let name: String
    /// The event's `data` member, `.null` when it has none.
    public let data: QMPValue
    /// QEMU's stamp (wall clock of the QEMU host): seconds and microseconds since the epoch.
    public let seconds: Int64
    public let microseconds: Int64
    /// `monotonicNanos()` when the bytes carrying the event were read: comparable across QEMUs on one host.
    public let receivedNanos: UInt64

    public init(name: String, data: QMPValue, seconds: Int64, microseconds: Int64, receivedNanos: UInt64) {
        self.name = name
        self.data = data
        self.seconds = seconds
        self.microseconds = microseconds
        self.receivedNanos = receivedNanos
    }

    /// QEMU's stamp in seconds since the epoch.
    public var timestamp: Double { Double(seconds) + Double(microseconds) / 1e6 }
}

/// Why a QMP exchange failed. Descriptions name the step: "QMP migrate-incoming: GenericError: ...".
public enum QMPError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No QMP monitor answered at `path` in time, or the socket cannot be used at all.
    case connectFailed(path: String, reason: String)
    /// QEMU answered `command` with an error reply.
    case commandFailed(command: String, class: String, description: String)
    /// Nothing arrived for `step` before its deadline.
    case timedOut(step: String, seconds: Double)
    /// The connection ended (QEMU exited, or the client was closed) while `step` was waiting.
    case disconnected(step: String, reason: String)
    /// QEMU sent something that is not what QMP promises.
    case malformed(step: String, detail: String)
    /// Writing to the monitor socket failed.
    case io(step: String, SyscallError)

    public var description: String {
        switch self {
        case .connectFailed(let path, let reason):
            return "QMP connect(\(path)): \(reason)"
        case .commandFailed(let command, let errorClass, let text):
            return "QMP \(command): \(errorClass): \(text)"
        case .timedOut(let step, let seconds):
            return "QMP \(step): nothing within \(seconds) s"
        case .disconnected(let step, let reason):
            return "QMP \(step): connection closed (\(reason))"
        case .malformed(let step, let detail):
            return "QMP \(step): malformed message: \(detail)"
        case .io(let step, let error):
            return "QMP \(step): \(error)"
        }
    }
}

// MARK: - Client

/// A QMP connection over a unix socket. Thread-safe: commands may be issued from several threads.
public final class QMPClient: @unchecked Sendable {
    // SAFETY: `fd` and `reader` are set in init and only used by close/deinit (close runs once, under
    // `closeOnce`); every mutable piece of protocol state lives in `inbox`, behind its lock.
    private let fd: FileDescriptor
    private let inbox: QMPInbox
    private let reader: JoinableThread
    private let sendLock = Mutex<Void>(())
    private let closeOnce = Mutex<Bool>(false)
    /// The socket this client is connected to.
    public let path: String
    /// QEMU's greeting, `{"QMP": {"version": ..., "capabilities": [...]}}`'s inner object.
    public private(set) var greeting: QMPValue = .null

    /// Events older than this many are dropped (oldest first); a migration produces a few dozen.
    public static let eventCapacity = 4096

    private init(fd: consuming FileDescriptor, path: String) {
        let raw = fd.rawValue
        let inbox = QMPInbox()
        self.fd = fd
        self.inbox = inbox
        self.path = path
        self.reader = JoinableThread(name: "epcopy-qmp") { QMPClient.readLoop(fd: raw, inbox: inbox) }
    }

    deinit { close() }

    /// Connects to QEMU's monitor at `path`, retrying while the socket does not exist yet or refuses
    /// (QEMU still starting), reads the greeting and leaves capabilities negotiation mode with
    /// `qmp_capabilities`. `abandonIf` is polled between attempts: returning true (e.g. "the QEMU
    /// process has exited") stops retrying at once.
    public static func connect(path: String, timeout: Duration,
                               abandonIf: (() -> Bool)? = nil) throws(QMPError) -> QMPClient {
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        var lastError = "no attempt"
        var connected: Int32?
        while connected == nil {
            switch openSocket(path) {
            case .success(let raw):
                connected = raw
            case .failure(let err) where err.errno == ENOENT || err.errno == ECONNREFUSED:
                lastError = err.description
                if abandonIf?() == true {
                    throw .connectFailed(path: path, reason: "gave up: the monitor's owner is gone (\(lastError))")
                }
                guard monotonicNanos() < deadline else {
                    throw .connectFailed(path: path, reason: "no monitor within \(HypervisorTime.seconds(timeout)) s"
                        + " (\(lastError))")
                }
                usleep(5_000)
            case .failure(let err):
                throw .connectFailed(path: path, reason: err.description)
            }
        }
        let client = QMPClient(fd: FileDescriptor(adopting: connected!), path: path)
        do throws(QMPError) {
            let greeting = try client.inbox.wait(step: "greeting", deadline: deadline, timeout: timeout) {
                $0.greeting
            }
            guard greeting["version"] != nil else {
                throw .malformed(step: "greeting", detail: "no version in \(greeting)")
            }
            client.greeting = greeting
            let remaining = deadline > monotonicNanos() ? deadline - monotonicNanos() : 0
            _ = try client.execute("qmp_capabilities", timeout: .nanoseconds(Int64(max(remaining, 1_000_000))))
        } catch {
            client.close()
            throw error
        }
        return client
    }

    /// Runs `command` and returns its `return` member. An error reply throws `.commandFailed`; no reply
    /// before `timeout` throws `.timedOut` (a late reply is then discarded).
    public func execute(_ command: String, arguments: [String: QMPValue] = [:],
                        timeout: Duration) throws(QMPError) -> QMPValue {
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        let id = inbox.register()
        defer { inbox.unregister(id) }
        var message: [String: QMPValue] = ["execute": .string(command), "id": .string(id)]
        if !arguments.isEmpty { message["arguments"] = .object(arguments) }
        try send(QMPValue.object(message).jsonText + "\n", step: command)
        let reply = try inbox.wait(step: command, deadline: deadline, timeout: timeout) { $0.replies[id] }
        if let error = reply["error"] {
            throw .commandFailed(command: command, class: error["class"]?.stringValue ?? "?",
                                 description: error["desc"]?.stringValue ?? error.jsonText)
        }
        return reply["return"] ?? .null
    }

    /// The first event called `name` received after monotonic time `after` (strictly later), or when
    /// `after` is nil the first such event received since connecting, including ones already stored.
    public func waitForEvent(_ name: String, timeout: Duration, after: UInt64? = nil) throws(QMPError) -> QMPEvent {
        try waitForEvent(name, timeout: timeout, after: after, where: { _ in true })
    }

    /// Like `waitForEvent(_:timeout:after:)`, for the first such event that also satisfies `predicate`
    /// (e.g. a MIGRATION event whose status is "completed").
    public func waitForEvent(_ name: String, timeout: Duration, after: UInt64? = nil,
                             where predicate: (QMPEvent) -> Bool) throws(QMPError) -> QMPEvent {
        try waitForEvent(among: [name], timeout: timeout, after: after, where: predicate)
    }

    /// The first event called one of `names` (and satisfying `predicate`), as `waitForEvent(_:timeout:after:)`:
    /// e.g. STOP, or a MIGRATION event saying the migration failed before it.
    public func waitForEvent(among names: Set<String>, timeout: Duration, after: UInt64? = nil,
                             where predicate: (QMPEvent) -> Bool) throws(QMPError) -> QMPEvent {
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        let step = "waiting for event " + names.sorted().joined(separator: " or ")
        return try inbox.wait(step: step, deadline: deadline, timeout: timeout) { state in
            state.events.first { event in
                names.contains(event.name) && event.receivedNanos > (after ?? 0) && predicate(event)
            }
        }
    }

    /// Every stored event called `name`, oldest first.
    public func events(named name: String) -> [QMPEvent] {
        inbox.withState { $0.events.filter { $0.name == name } }
    }

    /// Every stored event, oldest first.
    public var allEvents: [QMPEvent] { inbox.withState { $0.events } }

    /// Why the connection ended, or nil while it is open.
    public var closedReason: String? { inbox.withState { $0.closedReason } }

    /// Shuts the socket down, stops and joins the reader thread. Waiters fail with `.disconnected`.
    /// Idempotent; also run by deinit.
    public func close() {
        let first = closeOnce.withLock { closed -> Bool in
            defer { closed = true }
            return !closed
        }
        guard first else { return }
        inbox.markClosed("closed by epcopy")
        // shutdown(2) wakes the reader's blocking read with end-of-file; the descriptor itself is closed
        // only when this object goes away, after the reader has stopped using it.
        _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR))
        reader.join()
    }

    // MARK: Internals

    private func send(_ line: String, step: String) throws(QMPError) {
        if let reason = inbox.withState({ $0.closedReason }) {
            throw .disconnected(step: step, reason: reason)
        }
        Log.qmp.trace("qmp \(path) → \(line.dropLast())")
        let bytes = Array(line.utf8)
        let raw = fd.rawValue
        do throws(SyscallError) {
            try sendLock.withLock { _ throws(SyscallError) in
                var offset = 0
                while offset < bytes.count {
                    // MSG_NOSIGNAL: a QEMU that died turns into EPIPE here, not a SIGPIPE for epcopy.
                    let n = try Syscall.check("send(qmp)") {
                        bytes.withUnsafeBytes { buf in
                            Syscall.negErrno(Glibc.send(raw, buf.baseAddress! + offset, buf.count - offset,
                                                        Int32(MSG_NOSIGNAL)))
                        }
                    }
                    offset += n
                }
            }
        } catch {
            if error.errno == EPIPE || error.errno == ECONNRESET {
                throw .disconnected(step: step, reason: error.description)
            }
            throw .io(step: step, error)
        }
    }

    /// A blocking unix stream socket connected to `path`, with a send timeout so a QEMU that stops reading
    /// cannot block a command forever.
    private static func openSocket(_ path: String) -> Result<Int32, SyscallError> {
        Result { () throws(SyscallError) -> Int32 in try UnixStream.connect(path, sendTimeoutSeconds: 10).release() }
    }

    /// The reader thread: reads until end-of-file or an error, splitting lines and dispatching them.
    private static func readLoop(fd: Int32, inbox: QMPInbox) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        defer { buffer.deallocate() }
        var pending: [UInt8] = []
        var reason = "end of file (QEMU exited?)"
        loop: while true {
            let outcome: SyscallOutcome<Int>
            do throws(SyscallError) {
                outcome = try Syscall.run("read(qmp)") {
                    Syscall.negErrno(Glibc.read(fd, buffer.baseAddress, buffer.count))
                }
            } catch {
                reason = error.description
                break loop
            }
            let received = monotonicNanos()
            switch outcome {
            case .wouldBlock: continue
            case .done(0): break loop
            case .done(let n): pending.append(contentsOf: UnsafeRawBufferPointer(rebasing: buffer[..<n]))
            }
            var start = 0
            while let newline = pending[start...].firstIndex(of: 0x0A) {
                var end = newline
                if end > start, pending[end - 1] == 0x0D { end -= 1 }
                if end > start { inbox.dispatch(line: pending[start..<end], received: received) }
                start = newline + 1
            }
            pending.removeFirst(start)
        }
        inbox.markClosed(reason)
    }
}

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

// MARK: - Values

/// A JSON value as QMP sends and takes it.
public enum QMPValue: Sendable, Hashable, Codable, CustomStringConvertible {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([QMPValue])
    case object([String: QMPValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? c.decode(Int64.self) {
            self = .int(i)
        } else if let d = try? c.decode(Double.self) {
            self = .double(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([QMPValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: QMPValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .int(let i): try c.encode(i)
        case .double(let d): try c.encode(d)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    /// The member `key` of an object; nil for a missing key or a non-object.
    public subscript(key: String) -> QMPValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    /// The element at `index` of an array; nil when out of range or not an array.
    public subscript(index: Int) -> QMPValue? {
        if case .array(let a) = self, a.indices.contains(index) { return a[index] }
        return nil
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// An integer, also from a double with an integral value.
    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .double(let d) where d.rounded() == d && abs(d) < 9.2e18: return Int64(d)
        default: return nil
        }
    }

    /// A number as a double, whichever way it was written.
    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    public var arrayValue: [QMPValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var objectValue: [String: QMPValue]? {
        if case .object(let o) = self { return o }
        return nil
    }

    public var isNull: Bool { self == .null }

    /// Compact JSON on one line (keys sorted), as sent on the wire.
    public var jsonText: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding a tree of strings, numbers and containers cannot fail, except for a non-finite double.
        guard let data = try? encoder.encode(self) else { return "null" }
        return String(decoding: data, as: UTF8.self)
    }

    public var description: String { jsonText }

    /// Parses one JSON text.
    public static func parse(_ text: String) throws -> QMPValue {
        try parse(Array(text.utf8))
    }

    static func parse(_ bytes: some Collection<UInt8>) throws -> QMPValue {
        try JSONDecoder().decode(QMPValue.self, from: Data(bytes))
    }
}

extension QMPValue: ExpressibleByNilLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByStringLiteral, ExpressibleByArrayLiteral,
    ExpressibleByDictionaryLiteral
{
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(arrayLiteral elements: QMPValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, QMPValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { _, last in last }))
    }
}

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
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        return try inbox.wait(step: "waiting for event \(name)", deadline: deadline, timeout: timeout) { state in
            state.events.first { event in
                event.name == name && event.receivedNanos > (after ?? 0) && predicate(event)
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

/// Time conversions shared by the hypervisor files.
enum HypervisorTime {
    static func nanoseconds(_ d: Duration) -> UInt64 {
        let (s, atto) = d.components
        guard s >= 0 else { return 0 }
        return UInt64(s) * 1_000_000_000 + UInt64(max(atto, 0) / 1_000_000_000)
    }

    static func seconds(_ d: Duration) -> Double { Double(nanoseconds(d)) / 1e9 }
}

/// What the reader thread has received, shared with waiting callers under one condition variable.
final class QMPInbox: @unchecked Sendable {
    // SAFETY: `state` is only touched with `condition` locked (withState, wait, dispatch, markClosed).
    struct State {
        var greeting: QMPValue?
        var awaiting: Set<String> = []
        var replies: [String: QMPValue] = [:]
        var events: [QMPEvent] = []
        var closedReason: String?
        var nextID: UInt64 = 1
    }

    private let condition = NSCondition()
    private var state = State()

    func withState<T>(_ body: (inout State) -> T) -> T {
        condition.lock()
        defer { condition.unlock() }
        return body(&state)
    }

    func register() -> String {
        withState { s in
            let id = "epc-\(s.nextID)"
            s.nextID += 1
            s.awaiting.insert(id)
            return id
        }
    }

    func unregister(_ id: String) {
        withState { s in
            s.awaiting.remove(id)
            s.replies[id] = nil
        }
    }

    /// Waits until `found` returns a value, the connection closes, or `deadline` (monotonic) passes.
    func wait<T>(step: String, deadline: UInt64, timeout: Duration,
                 _ found: (State) -> T?) throws(QMPError) -> T {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let value = found(state) { return value }
            if let reason = state.closedReason { throw .disconnected(step: step, reason: reason) }
            let now = monotonicNanos()
            guard now < deadline else { throw .timedOut(step: step, seconds: HypervisorTime.seconds(timeout)) }
            // NSCondition takes a wall-clock date; the loop re-checks the monotonic deadline, so a clock
            // step only shortens or repeats one wait.
            _ = condition.wait(until: Date(timeIntervalSinceNow: min(Double(deadline - now) / 1e9, 1)))
        }
    }

    func dispatch(line: ArraySlice<UInt8>, received: UInt64) {
        Log.qmp.trace("qmp ← \(String(decoding: line, as: UTF8.self))")
        guard let message = try? QMPValue.parse(line), message.objectValue != nil else {
            Log.qmp.trace("qmp: ignoring a line that is not a JSON object")
            return
        }
        withState { s in
            if let event = message["event"]?.stringValue {
                let stamp = message["timestamp"]
                s.events.append(QMPEvent(name: event, data: message["data"] ?? .null,
                                         seconds: stamp?["seconds"]?.intValue ?? 0,
                                         microseconds: stamp?["microseconds"]?.intValue ?? 0,
                                         receivedNanos: received))
                if s.events.count > QMPClient.eventCapacity {
                    s.events.removeFirst(s.events.count - QMPClient.eventCapacity)
                }
            } else if let greeting = message["QMP"] {
                s.greeting = greeting
            } else if let id = message["id"]?.stringValue, s.awaiting.contains(id) {
                s.replies[id] = message
            } else {
                Log.qmp.trace("qmp: dropping a reply nobody waits for")
            }
            condition.broadcast()
        }
    }

    func markClosed(_ reason: String) {
        withState { s in
            if s.closedReason == nil { s.closedReason = reason }
            condition.broadcast()
        }
    }
}

// The hand-off between a QMP connection's reader thread and its callers: the greeting, replies by id and
// events in arrival order, each waited for under one condition variable with a deadline, and the reason
// the connection closed, which wakes every waiter at once.

import Foundation

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

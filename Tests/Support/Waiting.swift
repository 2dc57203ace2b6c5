// Waiting for events in tests: poll a condition until it holds or a deadline passes, never a fixed sleep. A
// negative check ("the source is still running") waits for the event that would prove it wrong — the process
// exiting, the counter stopping — so a slow machine makes it slower, never wrong.

import Foundation

/// Polls `condition` every `poll` until it returns true (true) or `deadline` has passed (false). The condition is
/// checked once more at the deadline, so a condition that became true during the last poll interval counts.
@discardableResult
public func waitUntil(deadline: Duration, poll: Duration = .milliseconds(10),
                      _ condition: () throws -> Bool) rethrows -> Bool {
    let clock = ContinuousClock()
    let end = clock.now.advanced(by: deadline)
    while clock.now < end {
        if try condition() { return true }
        sleepFor(min(poll, end - clock.now))
    }
    return try condition()
}

/// The value `body` returns once it is non-nil, or nil if `deadline` passes first.
public func waitFor<T>(deadline: Duration, poll: Duration = .milliseconds(10), _ body: () throws -> T?) rethrows -> T? {
    var found: T?
    try waitUntil(deadline: deadline, poll: poll) {
        found = try body()
        return found != nil
    }
    return found
}

/// Blocks the calling thread for `duration` (the poll interval of the waits above; not for tests to call).
private func sleepFor(_ duration: Duration) {
    guard duration > .zero else { return }
    let (seconds, attoseconds) = duration.components
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

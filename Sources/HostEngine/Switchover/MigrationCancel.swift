// A migration's point of no return, shared by whoever may cancel it and the side that switches. Before the
// switch a cancel wins: the source VM keeps running and the destination is cleaned up. Once the switch has
// begun the source is fenced (it will never run again) and holds pages the destination still needs, so a
// cancel can only be refused: recovery, not undo, is what finishes such a migration.

import Synchronization

public final class MigrationCancel: Sendable {
    private static let preparing = 0, cancelled = 1, switching = 2
    private let state = Atomic<Int>(MigrationCancel.preparing)

    public init() {}

    /// Asks to cancel. True if the migration will stop before its switch (or already was cancelled); false if
    /// the switch has begun and the migration can no longer be undone.
    public func request() -> Bool {
        let (exchanged, current) = state.compareExchange(expected: Self.preparing, desired: Self.cancelled,
                                                         ordering: .acquiringAndReleasing)
        return exchanged || current == Self.cancelled
    }

    /// Called by the source side right before the switch; false if a cancel came first.
    func beginSwitch() -> Bool {
        state.compareExchange(expected: Self.preparing, desired: Self.switching, ordering: .acquiringAndReleasing)
            .exchanged
    }

    public var hasSwitched: Bool { state.load(ordering: .acquiring) == Self.switching }

    /// A cancel won (the migration must stop before its switch).
    public var isRequested: Bool { state.load(ordering: .acquiring) == Self.cancelled }
}

// ControlRejoin: where one incoming migration's last word from the source daemon arrives — on the control
// connection that prepared the migration, or, when that connection was lost (a reset, a restarted
// router), on a new connection that names the session. The destination daemon's incoming handler waits
// here for that word (finish with the source's outcome, or abort) and leaves its answer here, so a
// source that lost the reply can ask again and get the same result. After the switch the destination
// never gives up a VM because a control connection broke: the VM lives here by then.

import Foundation

final class ControlRejoin: @unchecked Sendable {
    // SAFETY (@unchecked): every field is read and written under `condition`'s lock.
    enum Step: Sendable {
        case finish(SourceOutcome)
        case abort
    }

    private let condition = NSCondition()
    private var step: Step?
    private var answer: Result<MigrationResult, ControlError>?

    /// The source's word, if none was delivered yet; a second word (the source asking again after a lost
    /// reply) is not one: the first one stands. Returns whether this one was taken.
    @discardableResult
    func deliver(_ step: Step) -> Bool {
        condition.withLock {
            guard self.step == nil else { return false }
            self.step = step
            condition.broadcast()
            return true
        }
    }

    /// The source's word, waiting at most `millis` for it.
    func waitForStep(millis: Int) -> Step? {
        condition.withLock {
            let until = Date(timeIntervalSinceNow: Double(millis) / 1000)
            while step == nil, condition.wait(until: until) {}
            return step
        }
    }

    /// How the migration ended here, for whoever asks (the handler's own connection, or a rejoined source).
    func finish(_ result: Result<MigrationResult, ControlError>) {
        condition.withLock {
            answer = result
            condition.broadcast()
        }
    }

    var isFinished: Bool { condition.withLock { answer != nil } }

    /// How the migration ended, waiting at most `millis`; nil if it has not ended by then.
    func waitForAnswer(millis: Int) -> Result<MigrationResult, ControlError>? {
        condition.withLock {
            let until = Date(timeIntervalSinceNow: Double(millis) / 1000)
            while answer == nil, condition.wait(until: until) {}
            return answer
        }
    }
}

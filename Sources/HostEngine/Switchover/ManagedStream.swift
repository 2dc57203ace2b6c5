// QEMU's own migration stream when another manager owns the QEMU (libvirt): the source side does not send QMP
// migrate itself. At the switch it starts the manager's migration call on a thread of its own, watches for STOP
// on its own monitor as usual, and at the drain waits for the call to return: the manager's word that the
// destination runs the guest (libvirt's migration returns once its destination has resumed it).

import Foundation
import Synchronization

public final class ManagedStream: Sendable {
    private let name: String
    private let run: @Sendable () throws -> Void
    private let ended = ResultSlot<Double, MigrationError>()
    private let thread = Mutex<JoinableThread?>(nil)

    /// `run` is the manager's blocking migration call, e.g. `virDomainMigrate`; `name` names it in errors.
    public init(name: String, run: @escaping @Sendable () throws -> Void) {
        self.name = name
        self.run = run
    }

    /// Starts the call on its own thread. Call once.
    func start() {
        let (run, ended, name) = (run, ended, name)
        let started = JoinableThread(name: "epcopy-managed") {
            do {
                try run()
                ended.set(.success(Date().timeIntervalSince1970))
            } catch { ended.set(.failure(.failed("\(name): \(error)"))) }
        }
        thread.withLock { $0 = started }
    }

    /// Why the call failed, once it has; nil while it runs or after it succeeded.
    var failure: MigrationError? {
        if case .failure(let error) = ended.peek() { return error }
        return nil
    }

    /// Waits for the call to return; throws its failure.
    func wait() throws(MigrationError) {
        thread.withLock { $0 }?.join()
        _ = try ended.get()
    }
}

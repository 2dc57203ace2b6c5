// What a managed destination (a libvirt domain's incoming QEMU) needs before the source hears of it: the
// shim's hand-over socket, the engine's listener, and how to describe the QEMU once its memory is handed over.

import EpcopyProtocol
import Foundation


/// What a managed side (`DestinationSide.init(managed:)`) needs, made before the source hears of it: the shim's
/// hand-over socket (the path the domain's XML gives the shim), the engine's listener (its port goes to the
/// source), and how to describe the QEMU once it has handed over (`describe(pid, RAM file, RAM bytes)`: a config
/// whose `qmpSocket` is epcopy's monitor of it).
struct ManagedIncoming: Sendable {
    let handover: UffdHandoverListener
    let engineListener: ListenerHolder
    let describe: @Sendable (Int32, String, UInt64) throws -> QEMUConfig
    var timeout: Duration = .seconds(120)
    /// Asked about every 500 ms while waiting for the hand-over: true gives the wait up.
    var abandonIf: @Sendable () -> Bool = { false }

    init(handover: UffdHandoverListener, engineListener: consuming Listener,
         describe: @escaping @Sendable (Int32, String, UInt64) throws -> QEMUConfig) {
        self.handover = handover
        self.engineListener = ListenerHolder(engineListener)
        self.describe = describe
    }

    /// The port the engine listens on (every address of this host).
    var enginePort: UInt16 { engineListener.listener.endpoint.port }

    func waitForHandover() throws -> UffdHandover {
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        while try !handover.hasPendingConnection(within: .milliseconds(500)) {
            if abandonIf() { throw MigrationError.failed("the source called the migration off") }
            if monotonicNanos() > deadline {
                throw MigrationError.failed("no QEMU handed its memory over within \(timeout) (did libvirt start one?)")
            }
        }
        return try handover.accept(timeout: .seconds(10))
    }
}
// The daemon's VMs outlive the daemon: each QEMU it starts (or keeps after receiving it) runs behind its keeper
// (QEMUConfig.outlivesEpcopy) and is on record (SessionStore, kind "vm") until it is stopped, migrated away or
// shut down with the daemon. A daemon killed by SIGKILL or a crash therefore costs no VM: its successor takes
// every recorded QEMU back (`adoptVMs`) before it serves anyone. A VM whose migration had switched is fenced (the
// destination runs the guest now): it is ended, never resumed, and its RAM file is left to the resumed push.

import EpcopyProtocol
import Foundation

/// What a restarted daemon needs to take back a VM it was running.
public struct VMRecord: SessionRecord, Equatable {
    public static var kind: String { "vm" }
    /// This run of the VM: a random number (a VM stopped and started again under its name is another run).
    public var session: UInt64
    public var name: String
    public var spec: VMSpec
    public var qemuPid: Int32

    public init(session: UInt64, name: String, spec: VMSpec, qemuPid: Int32) {
        self.session = session
        self.name = name
        self.spec = spec
        self.qemuPid = qemuPid
    }
}

extension Daemon {
    /// The QEMU configuration of VM `name` on this daemon (the same paths whoever started it).
    func vmConfig(_ spec: VMSpec, name: String) -> QEMUConfig {
        var config = spec.config(name: "\(options.instance)-\(name)", deadlineSeconds: options.vmDeadlineSeconds)
        config.forwardHost = options.listen.host
        config.outlivesEpcopy = true
        return config
    }

    /// Puts VM `name` on record, so that a successor of this daemon takes it back. A QEMU that dies with its
    /// daemon (QEMU's own migration modes bind the destination's) is not recorded.
    func recordVM(_ name: String, _ vm: QEMUProcess) {
        guard vm.config.outlivesEpcopy else { return }
        var spec = VMSpec(vm.config)
        spec.name = name
        let record = VMRecord(session: UInt64.random(in: 1...UInt64.max), name: name, spec: spec, qemuPid: vm.pid)
        do {
            try store.save(record)
            if let old = vmRecords.withLock({ r -> UInt64? in defer { r[name] = record.session }; return r[name] }) {
                store.remove(VMRecord.self, session: old)
            }
        } catch {
            logger.error("could not record VM \(name) in \(options.stateDirectory): \(error); if this daemon dies, its successor will not take it back")
        }
    }

    /// VM `name` is no longer this daemon's (stopped, migrated away, or ended with the daemon).
    func forgetVM(_ name: String) {
        if let session = vmRecords.withLock({ $0.removeValue(forKey: name) }) { store.remove(VMRecord.self, session: session) }
    }

    /// Takes back every VM a previous daemon left running; called once, before the daemon serves anyone. VMs in
    /// `fenced` (their migration had switched) are ended instead. Returns the RAM files the adopted VMs use.
    func adoptVMs(fenced: Set<String>) -> Set<String> {
        let (records, complaints) = store.records(VMRecord.self)
        for complaint in complaints { logger.error("\(complaint)") }
        var inUse = Set<String>()
        for record in records {
            store.remove(VMRecord.self, session: record.session)
            guard (try? Self.validName(record.name)) != nil, vms.withLock({ $0[record.name] == nil }) else {
                logger.error("set aside the record of VM \(record.name): not a valid name, or a VM of that name runs here")
                continue
            }
            let config = vmConfig(record.spec, name: record.name)
            let vm: QEMUProcess
            do { vm = try QEMUProcess.adopt(config, qemuPid: record.qemuPid, connectTimeout: .seconds(20)) } catch {
                logger.warning("VM \(record.name) (QEMU pid \(record.qemuPid)) did not outlive the previous daemon: \(error)")
                continue
            }
            if fenced.contains(record.name) {
                // The guest runs on the destination now: this copy must never run again. Its RAM file is the
                // fenced source the resumed push reads.
                vm.keepRAMFile = true
                vm.kill()
                vm.teardown()
                logger.info("ended VM \(record.name)'s fenced source QEMU \(record.qemuPid): its migration had switched")
                continue
            }
            inUse.insert(config.ramFile)
            let status = vm.runState ?? "unknown"
            vms.withLock { $0[record.name] = vm }
            recordVM(record.name, vm)
            if status == "running" {
                keepHotReport(record.name, vm)
                logger.warning("took back VM \(record.name) (QEMU pid \(vm.pid)), left running by a previous daemon")
            } else {
                // Stopped by a migration whose switch this daemon never recorded: the destination may run the guest
                // already, so this copy is not resumed; an operator who knows it does not can `cont` it by QMP.
                logger.error("took back VM \(record.name) (QEMU pid \(vm.pid)) but it is \(status), not running: a migration the previous daemon was sending may have switched; it is left as it is")
            }
        }
        return inUse
    }
}

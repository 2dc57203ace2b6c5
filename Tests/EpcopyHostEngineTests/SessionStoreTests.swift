// SessionStore: what a restarted daemon reads back is exactly what was saved, a save replaces the old record
// whole, and a file that is not a record is set aside with a complaint instead of being acted on.

import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Testing

@Suite(.tier(.unit)) struct SessionStoreTests {
    private func record(_ session: UInt64, stop: Double = 1_796_606_788.25) -> SourceSessionRecord {
        var record = SourceSessionRecord(session: session, vmName: "web-1", ramFile: "/dev/shm/epcopy-web-1.ram",
                                         regionPages: 131_072, engine: "10.0.0.2:40123", destinationDaemon: "10.0.0.2:7470",
                                         options: MigrationRequestOptions(mode: .enlightened, verify: true, agent: true,
                                                                          agentTimeoutMillis: 3000, reconnectTimeoutMillis: 120_000,
                                                                          failoverAfterMillis: 1500),
                                         stopTimestamp: stop, counterBefore: 7)
        // The destination's other addresses go on record with it (a successor goes round them too).
        record.alsoTo = ["10.1.0.2:7470", "10.2.0.2:7470"]
        return record
    }

    private func directory() -> String {
        let path = NSTemporaryDirectory() + "epcopy-store-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        return path
    }

    @Test func whatIsSavedIsWhatARestartReads() throws {
        let store = SessionStore(directory: directory())
        defer { try? FileManager.default.removeItem(atPath: store.directory) }
        #expect(store.sourceRecords().records.isEmpty)
        try store.save(record(42))
        try store.save(record(43))
        // A second save of the same session replaces it whole.
        try store.save(record(42, stop: 5))
        let (records, complaints) = store.sourceRecords()
        #expect(complaints.isEmpty)
        #expect(records == [record(42, stop: 5), record(43)])
        // No temporary file is left behind by a save that completed.
        let names = try FileManager.default.contentsOfDirectory(atPath: store.directory)
        #expect(!names.contains { $0.hasSuffix(".tmp") }, "\(names)")
        store.remove(SourceSessionRecord.self, session: 42)
        #expect(store.sourceRecords().records == [record(43)])
    }

    /// A VM's record and a migration's are filed apart: neither kind reads the other's files, and a record saved
    /// before the switch reads back as not switched (a successor calls that migration off, it never resumes it).
    @Test func kindsAreKeptApartAndAnUnswitchedRecordSaysSo() throws {
        let store = SessionStore(directory: directory())
        defer { try? FileManager.default.removeItem(atPath: store.directory) }
        let spec = VMSpec(name: "web-1", memoryMiB: 512, kernel: "/k", initrd: "/i", append: nil, accel: "tcg")
        let vm = VMRecord(session: 9, name: "web-1", spec: spec, qemuPid: 4242)
        try store.save(vm)
        try store.save(record(9, stop: 0))
        #expect(store.records(VMRecord.self).records == [vm])
        let sessions = store.sourceRecords().records
        #expect(sessions.map(\.session) == [9] && sessions.allSatisfy { !$0.switched })
        #expect(store.records(VMRecord.self).complaints.isEmpty && store.sourceRecords().complaints.isEmpty)
        store.remove(VMRecord.self, session: 9)
        #expect(store.records(VMRecord.self).records.isEmpty)
        #expect(store.sourceRecords().records.count == 1)
        #expect(record(10).switched)
    }

    @Test func aFileThatIsNotARecordIsSetAsideNotUsed() throws {
        let store = SessionStore(directory: directory())
        defer { try? FileManager.default.removeItem(atPath: store.directory) }
        try store.save(record(7))
        // Garbage, a truncated record, and a record filed under another session's name.
        let good = try Data(contentsOf: URL(fileURLWithPath: "\(store.directory)/source-7.json"))
        try Data("not json".utf8).write(to: URL(fileURLWithPath: "\(store.directory)/source-1.json"))
        try good.prefix(good.count / 2).write(to: URL(fileURLWithPath: "\(store.directory)/source-2.json"))
        try good.write(to: URL(fileURLWithPath: "\(store.directory)/source-3.json"))
        let (records, complaints) = store.sourceRecords()
        #expect(records == [record(7)])
        #expect(complaints.count == 3, "\(complaints)")
        let names = Set(try FileManager.default.contentsOfDirectory(atPath: store.directory))
        #expect(names == ["source-7.json", "source-1.json.bad", "source-2.json.bad", "source-3.json.bad"])
        // Set aside once: the next restart is quiet.
        #expect(store.sourceRecords().complaints.isEmpty)
    }
}

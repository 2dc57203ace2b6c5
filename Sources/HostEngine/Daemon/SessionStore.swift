// SessionStore: the migrations a daemon must be able to finish after it was killed, on disk. One JSON file per
// session under the daemon's state directory, written atomically (a temporary file, fsync, rename, fsync of
// the directory), so a restarted daemon finds either the whole record or the previous one, never half. The
// source writes its record when the destination has prepared and again at the switch (from STOP its RAM file is
// the only copy of what has not moved), and removes it once the destination has every page; a restarted source
// daemon calls off the migrations that had not switched and takes up those that had. VMs are on record too
// (VMRecord, DaemonVMs).
// The destination writes its record when it has prepared (its QEMU outlives the daemon) and again at RESUME
// and after the free scan; a restarted destination daemon adopts the QEMU and carries on receiving.
// Records are untrusted input like any other: a file that does not decode is set aside, not acted on.

import EpcopyProtocol
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What a restarted source daemon needs to finish a migration it had switched (or to call off one it had not).
public struct SourceSessionRecord: Codable, Sendable, Equatable {
    public var session: UInt64
    public var vmName: String
    /// The fenced RAM file (final since STOP).
    public var ramFile: String
    public var regionPages: UInt64
    /// The destination engine (host:port) and daemon (host:port).
    public var engine: String
    public var destinationDaemon: String
    /// The destination daemon's other addresses (host:port), which the route goes round when the link is down.
    public var alsoTo: [String]?
    public var options: MigrationRequestOptions
    /// QMP's STOP timestamp (wall clock, seconds: it survives a restart, unlike the monotonic clock, so a
    /// resumed migration's T_release counts from STOP) and the guest's counter before the switch.
    public var stopTimestamp: Double
    public var counterBefore: Int?
    /// False from prepare to STOP: a successor then calls the destination off and keeps the VM; true from STOP.
    public var switched: Bool
    /// Set when the VM is a libvirt domain (its UUID): its QEMU is libvirt's, and after a crash libvirt's state of
    /// the domain says whether the switch held (the domain gone here) or libvirt took it back (running here).
    public var libvirtUUID: String?

    public init(session: UInt64, vmName: String, ramFile: String, regionPages: UInt64, engine: String,
                destinationDaemon: String, options: MigrationRequestOptions, stopTimestamp: Double, counterBefore: Int?) {
        self.session = session
        self.vmName = vmName
        self.ramFile = ramFile
        self.regionPages = regionPages
        self.engine = engine
        self.destinationDaemon = destinationDaemon
        self.options = options
        self.stopTimestamp = stopTimestamp
        self.counterBefore = counterBefore
        switched = stopTimestamp > 0
    }
}

/// What a restarted destination daemon needs to carry on receiving a migration.
public struct DestinationSessionRecord: Codable, Sendable, Equatable {
    public var session: UInt64 { succession.session }
    public var vmName: String
    public var options: MigrationRequestOptions
    public var succession: DestinationSuccession

    enum CodingKeys: String, CodingKey {
        case vmName = "vm_name"
        case options, succession
    }

    public init(vmName: String, options: MigrationRequestOptions, succession: DestinationSuccession) {
        self.vmName = vmName
        self.options = options
        self.succession = succession
    }
}

/// A record of one side of a migration, filed under its kind.
public protocol SessionRecord: Codable, Sendable {
    static var kind: String { get }
    var session: UInt64 { get }
}

extension SourceSessionRecord: SessionRecord { public static var kind: String { "source" } }
extension DestinationSessionRecord: SessionRecord { public static var kind: String { "destination" } }

public struct SessionStore: Sendable {
    public let directory: String

    public init(directory: String) { self.directory = directory }

    private func path<R: SessionRecord>(_ kind: R.Type, _ session: UInt64) -> String { "\(directory)/\(R.kind)-\(session).json" }

    /// Writes `record` so that a crash at any point leaves the old file or the new one.
    public func save<R: SessionRecord>(_ record: R) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = try encoder.encode(record)
        let final = path(R.self, record.session)
        let temporary = final + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SyscallError(call: "open(\(temporary))", errno: errno) }
        var failure: SyscallError?
        data.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0, errno == EINTR { continue }
                if n <= 0 { failure = SyscallError(call: "write(\(temporary))", errno: errno); return }
                offset += n
            }
        }
        if failure == nil, fsync(fd) != 0 { failure = SyscallError(call: "fsync(\(temporary))", errno: errno) }
        close(fd)
        if let failure {
            unlink(temporary)
            throw failure
        }
        guard rename(temporary, final) == 0 else {
            let error = SyscallError(call: "rename(\(temporary))", errno: errno)
            unlink(temporary)
            throw error
        }
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            _ = fsync(dir)
            close(dir)
        }
    }

    public func remove<R: SessionRecord>(_ kind: R.Type, session: UInt64) {
        unlink(path(kind, session))
    }

    public func sourceRecords() -> (records: [SourceSessionRecord], complaints: [String]) { records(SourceSessionRecord.self) }

    public func destinationRecords() -> (records: [DestinationSessionRecord], complaints: [String]) {
        records(DestinationSessionRecord.self)
    }

    /// Every record of a kind in the directory. Files that do not decode are renamed `*.bad` and reported, never used.
    public func records<R: SessionRecord>(_ kind: R.Type) -> (records: [R], complaints: [String]) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return ([], []) }
        var records: [R] = []
        var complaints: [String] = []
        for name in names.sorted() where name.hasPrefix("\(R.kind)-") && name.hasSuffix(".json") {
            let file = "\(directory)/\(name)"
            guard let data = FileManager.default.contents(atPath: file), data.count <= 16 << 20,
                  let record = try? JSONDecoder().decode(R.self, from: data),
                  name == "\(R.kind)-\(record.session).json"
            else {
                complaints.append("\(file) is not a session record; set aside as \(name).bad")
                rename(file, file + ".bad")
                continue
            }
            records.append(record)
        }
        return (records, complaints)
    }
}

// The libvirt calls of a migration that libvirt performs itself, peer to peer (the source libvirtd talks to the
// destination's): start it (virDomainMigrateToURI3, blocking until libvirt is done), switch a running one to
// post-copy, abort it, and read a job's statistics (downtime, bytes) while it runs or once it has completed.

import CVirt
#if canImport(Glibc)
import Glibc
#endif

/// How libvirt is to migrate a domain.
public struct LibvirtMigrationRequest: Sendable {
    /// The destination libvirtd, as the source libvirtd reaches it (e.g. `qemu+tcp://10.0.0.2/system`).
    public var destinationURI: String
    /// Where QEMU's own stream goes (e.g. `tcp://10.0.0.2`): libvirt would otherwise use the destination's host name.
    public var streamURI: String?
    /// Post-copy allowed (libvirt's VIR_MIGRATE_POSTCOPY; the switch is `startPostCopy`).
    public var postcopy: Bool
    /// Keep the domain defined (shut off) on the source, instead of undefining it there.
    public var keepSourceDefinition: Bool

    public init(destinationURI: String, streamURI: String?, postcopy: Bool, keepSourceDefinition: Bool) {
        self.destinationURI = destinationURI
        self.streamURI = streamURI
        self.postcopy = postcopy
        self.keepSourceDefinition = keepSourceDefinition
    }
}

/// A migration job's statistics, as libvirt reports them.
public struct LibvirtJobStats: Sendable, Equatable {
    public var elapsedMillis: UInt64?
    public var downtimeMillis: UInt64?
    public var dataTotal: UInt64?
    public var dataProcessed: UInt64?
    public var memoryTransferred: UInt64?
    /// Pages the destination asked for after the switch to post-copy (its faults).
    public var postcopyRequests: UInt64?
}

extension LibvirtDomain {
    /// Live, peer to peer, persistent on the destination. Returns when libvirt has finished: the domain runs
    /// on the destination (and is gone from, or shut off on, this host), or the call throws and it runs here.
    public func migrate(_ request: LibvirtMigrationRequest) throws(LibvirtError) {
        var flags = VIR_MIGRATE_LIVE.rawValue | VIR_MIGRATE_PEER2PEER.rawValue | VIR_MIGRATE_PERSIST_DEST.rawValue
        if !request.keepSourceDefinition { flags |= VIR_MIGRATE_UNDEFINE_SOURCE.rawValue }
        if request.postcopy { flags |= VIR_MIGRATE_POSTCOPY.rawValue }
        var params: virTypedParameterPtr? = nil
        var count: Int32 = 0
        var capacity: Int32 = 0
        defer { virTypedParamsFree(params, count) }
        if let stream = request.streamURI {
            guard virTypedParamsAddString(&params, &count, &capacity, VIR_MIGRATE_PARAM_URI, stream) == 0 else {
                throw LibvirtError("migration parameter \(VIR_MIGRATE_PARAM_URI)")
            }
        }
        guard virDomainMigrateToURI3(domain, request.destinationURI, params, UInt32(count), UInt32(flags)) == 0 else {
            throw LibvirtError("libvirt's migration of \(name) to \(request.destinationURI)")
        }
    }

    /// Switches a running post-copy-enabled migration to post-copy.
    public func startPostCopy() throws(LibvirtError) {
        guard virDomainMigrateStartPostCopy(domain, 0) == 0 else { throw LibvirtError("switch \(name) to post-copy") }
    }

    /// Aborts the domain's running job (a migration that has not switched keeps the domain here).
    public func abortJob() throws(LibvirtError) {
        guard virDomainAbortJob(domain) == 0 else { throw LibvirtError("abort the job of \(name)") }
    }

    /// The running job's statistics, or (`completed`) those of the last completed one; nil when there is none.
    /// Whether libvirt runs a job on the domain (a migration among them); nil when libvirt cannot say.
    public var hasActiveJob: Bool? {
        var info = virDomainJobInfo()
        guard virDomainGetJobInfo(domain, &info) == 0 else { return nil }
        return info.type != Int32(VIR_DOMAIN_JOB_NONE.rawValue)
    }

    public func jobStats(completed: Bool) -> LibvirtJobStats? {
        var type: Int32 = 0
        var params: virTypedParameterPtr? = nil
        var count: Int32 = 0
        let flags = completed ? VIR_DOMAIN_JOB_STATS_COMPLETED.rawValue : 0
        guard virDomainGetJobStats(domain, &type, &params, &count, UInt32(flags)) == 0 else { return nil }
        defer { virTypedParamsFree(params, count) }
        guard type != Int32(VIR_DOMAIN_JOB_NONE.rawValue) else { return nil }
        func value(_ key: String) -> UInt64? {
            var v: UInt64 = 0
            return virTypedParamsGetULLong(params, count, key, &v) == 1 ? v : nil
        }
        return LibvirtJobStats(elapsedMillis: value(VIR_DOMAIN_JOB_TIME_ELAPSED), downtimeMillis: value(VIR_DOMAIN_JOB_DOWNTIME),
                               dataTotal: value(VIR_DOMAIN_JOB_DATA_TOTAL), dataProcessed: value(VIR_DOMAIN_JOB_DATA_PROCESSED),
                               memoryTransferred: value(VIR_DOMAIN_JOB_MEMORY_PROCESSED),
                               postcopyRequests: value(VIR_DOMAIN_JOB_MEMORY_POSTCOPY_REQS))
    }
}

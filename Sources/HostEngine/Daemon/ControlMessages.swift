// The daemons' control protocol as types: every request a client or a peer daemon sends and every
// reply, shared by the daemon and the CLI. One encoding (JSONEncoder, one object per line on the
// ControlChannel); a line that does not decode — unknown request, missing or wrong-typed field — is
// refused with an error reply naming the field, never a crash. Values are validated where they are used
// (VM names, specs, ranges: see Daemon).

/// What a client or peer daemon asks.
public enum ControlRequest: Codable, Sendable {
    case vmStart(name: String, spec: VMSpec)
    case vmList
    case vmStop(name: String)
    case vmSerial(name: String)
    /// Client → source daemon: move VM `name` to the daemon at `to`.
    case migrate(MigrateRequest)
    /// Client → source daemon: call off the migration of VM `name` if it has not switched yet.
    case cancel(name: String)
    /// Client → source daemon: wait for the migration of VM `name` that this daemon sends, or took up again
    /// after it was restarted past the switch (answered with `result`; the last one's, once it has ended).
    case resume(name: String)
    /// Client → source daemon: the destination of the switched migration of VM `name` is reached at `to` from
    /// now on (another address of the same daemon's host): the engines and the control link go there.
    case redirect(name: String, to: String)
    /// Source daemon → destination daemon: prepare to receive (answered with `prepared`).
    case incoming(IncomingRequest)
    /// Source daemon → destination daemon: prepare to receive a libvirt domain that the libvirt daemons move
    /// (answered with `preparedDomain`).
    case incomingDomain(IncomingDomainRequest)
    /// Source daemon → destination daemon, after the switch: what the source saw (answered with `result`).
    case finish(source: SourceOutcome)
    /// Source daemon → destination daemon, before the switch: the migration is off.
    case abort
    /// The same two on a new connection, when the one that prepared migration `session` was lost (see
    /// ControlRejoin): answered like the originals, with the same result if the finish already ran.
    case finishSession(session: UInt64, source: SourceOutcome)
    case abortSession(session: UInt64)

    /// The request's name in logs.
    public var name: String {
        switch self {
        case .vmStart: "vm.start"
        case .vmList: "vm.list"
        case .vmStop: "vm.stop"
        case .vmSerial: "vm.serial"
        case .migrate: "migrate"
        case .cancel: "cancel"
        case .resume: "resume"
        case .redirect: "redirect"
        case .incoming: "incoming"
        case .incomingDomain: "incoming (libvirt domain)"
        case .finish: "finish"
        case .abort: "abort"
        case .finishSession: "finish (rejoined)"
        case .abortSession: "abort (rejoined)"
        }
    }
}

/// How one migration is to run, as the operator asked (the same fields travel from CLI to source daemon
/// and from source daemon to destination daemon).
public struct MigrationRequestOptions: Codable, Sendable, Equatable {
    public var mode: MigrationMode
    public var verify: Bool
    /// Ask the guest agent (false: plain external post-copy).
    public var agent: Bool
    public var agentTimeoutMillis: Int
    /// After the switch, how long the engines try to get a lost link back (nil: the default, 120 s).
    public var reconnectTimeoutMillis: Int?
    /// Silence between the engines that counts as a lost link (nil: the default, 2 s).
    public var keepaliveTimeoutMillis: Int?
    /// With more than one address of the destination: how long the link may stay down on one before the next
    /// is tried (nil: the default, 2 s).
    public var failoverAfterMillis: Int?
    /// Enlightened mode: the destination host's NUMA node for the guest's RAM, "auto" or a node number (nil: the
    /// destination daemon's default, `serve --numa-node`).
    public var numaNode: String?

    public init(mode: MigrationMode, verify: Bool, agent: Bool, agentTimeoutMillis: Int,
                reconnectTimeoutMillis: Int? = nil, keepaliveTimeoutMillis: Int? = nil, failoverAfterMillis: Int? = nil) {
        self.mode = mode
        self.verify = verify
        self.agent = agent
        self.agentTimeoutMillis = agentTimeoutMillis
        self.reconnectTimeoutMillis = reconnectTimeoutMillis
        self.keepaliveTimeoutMillis = keepaliveTimeoutMillis
        self.failoverAfterMillis = failoverAfterMillis
    }
}

public struct MigrateRequest: Codable, Sendable {
    public var name: String
    /// The destination daemon, IPv4-ADDRESS:PORT.
    public var to: String
    /// The same daemon's other addresses (other paths to its host), tried in turn when the link stays down.
    public var alsoTo: [String]?
    public var options: MigrationRequestOptions
    /// `name` is a domain of the libvirt daemon this daemon serves with (`serve --libvirt`), moved by the libvirt
    /// daemons of both hosts.
    public var libvirt: Bool?
    /// With `libvirt`: keep the domain defined (shut off) on the source instead of undefining it there.
    public var keepSourceDefinition: Bool?

    public init(name: String, to: String, alsoTo: [String] = [], options: MigrationRequestOptions) {
        self.name = name
        self.to = to
        self.alsoTo = alsoTo.isEmpty ? nil : alsoTo
        self.options = options
    }
}

public struct IncomingDomainRequest: Codable, Sendable {
    /// The domain's name and UUID (the same on both hosts).
    public var name: String
    public var uuid: String
    public var session: UInt64
    public var options: MigrationRequestOptions

    public init(name: String, uuid: String, session: UInt64, options: MigrationRequestOptions) {
        self.name = name
        self.uuid = uuid
        self.session = session
        self.options = options
    }
}

public struct IncomingRequest: Codable, Sendable {
    public var spec: VMSpec
    public var session: UInt64
    public var options: MigrationRequestOptions

    public init(spec: VMSpec, session: UInt64, options: MigrationRequestOptions) {
        self.spec = spec
        self.session = session
        self.options = options
    }
}

/// One VM a daemon runs.
public struct VMEntry: Codable, Sendable {
    public var name: String
    public var pid: Int32
    public var running: Bool
    public var memoryMiB: Int
}

/// What the daemon answers. A request gets exactly one final reply; `migrate` is preceded by `progress`.
public enum ControlReply: Codable, Sendable {
    case ok
    case started(name: String, pid: Int32, ramFile: String)
    case vms([VMEntry])
    case serial(log: String)
    /// The destination is ready: QEMU's migration stream goes to `migrationURI`, RAM to `engine` (enlightened).
    case prepared(migrationURI: String, engineHost: String?, enginePort: UInt16?)
    /// The destination is ready for a libvirt domain: the source's libvirtd migrates it to `libvirtURI`
    /// (peer to peer), QEMU's own stream goes to `streamURI`.
    /// Where the source's libvirtd reaches this host's, where QEMU's stream goes, and (enlightened mode) the port
    /// this host's engine listens on.
    case preparedDomain(libvirtURI: String, streamURI: String, enginePort: UInt16?)
    case progress(MigrationProgress)
    case result(MigrationResult)
    case error(String)
}

extension DecodingError {
    /// Which field was wrong and how, for an error reply (the default description is Swift's, not the user's).
    var controlDescription: String {
        func path(_ context: Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? "the request" : keys.joined(separator: ".")
        }
        switch self {
        case .typeMismatch(let type, let context): return "\(path(context)): expected \(type)"
        case .valueNotFound(let type, let context): return "\(path(context)): missing \(type) value"
        case .keyNotFound(let key, let context): return "\(path(context)): missing field \(key.stringValue)"
        case .dataCorrupted(let context): return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(self)"
        }
    }
}

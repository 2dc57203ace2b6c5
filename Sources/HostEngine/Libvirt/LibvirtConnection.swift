// LibvirtConnection: one connection to a libvirt daemon through libvirt's own C API (libvirt-dev), and the few
// calls epcopy makes on it: look a domain up, read its XML (live, or the persistent definition with its secrets,
// so that a redefinition loses nothing), define a new persistent definition, and say what state a domain is in.
// Errors carry libvirt's own message. Nothing here scrapes virsh output.

import CVirt
#if canImport(Glibc)
import Glibc
#endif

public struct LibvirtError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ what: String) {
        let detail = virGetLastErrorMessage().map { String(cString: $0) } ?? "unknown error"
        description = "\(what): \(detail)"
    }
    init(message: String) { description = message }
}

public final class LibvirtConnection: @unchecked Sendable {
    // SAFETY (@unchecked): a virConnectPtr may be used from any thread (libvirt locks it); it is closed once, in deinit.
    private let connection: virConnectPtr
    public let uri: String

    /// Opens `uri` (e.g. `qemu:///system`, `qemu+unix:///system?socket=PATH`). libvirt's default error handler
    /// (a line on stderr for every failed call) is turned off: errors come back as LibvirtError.
    public init(uri: String) throws(LibvirtError) {
        virSetErrorFunc(nil, { _, _ in })
        guard let c = virConnectOpen(uri) else { throw LibvirtError("cannot connect to libvirt at \(uri)") }
        connection = c
        self.uri = uri
    }

    deinit { virConnectClose(connection) }

    /// The daemon's libvirt version, e.g. "9.0.0".
    public func libvirtVersion() throws(LibvirtError) -> String {
        var version: UInt = 0
        guard virConnectGetLibVersion(connection, &version) == 0 else { throw LibvirtError("libvirt version") }
        return "\(version / 1_000_000).\(version / 1000 % 1000).\(version % 1000)"
    }

    public func domain(_ name: String) throws(LibvirtError) -> LibvirtDomain {
        guard let d = virDomainLookupByName(connection, name) else { throw LibvirtError("no domain \(name) at \(uri)") }
        return LibvirtDomain(d, name: name)
    }

    /// Whether the daemon has a domain of that name (running or defined).
    public func hasDomain(_ name: String) -> Bool {
        guard let d = virDomainLookupByName(connection, name) else { return false }
        virDomainFree(d)
        return true
    }

    /// Makes `xml` the persistent definition of its domain (a new one, or a replacement of the existing one's).
    @discardableResult
    public func define(_ xml: String) throws(LibvirtError) -> LibvirtDomain {
        guard let d = virDomainDefineXML(connection, xml) else { throw LibvirtError("define the domain") }
        let name = virDomainGetName(d).map { String(cString: $0) } ?? "?"
        return LibvirtDomain(d, name: name)
    }
}

public final class LibvirtDomain: @unchecked Sendable {
    // SAFETY (@unchecked): a virDomainPtr may be used from any thread; it is freed once, in deinit.
    let domain: virDomainPtr
    public let name: String

    init(_ domain: virDomainPtr, name: String) {
        self.domain = domain
        self.name = name
    }

    deinit { virDomainFree(domain) }

    /// The live XML of a running domain (its persistent definition when it is not running).
    public func liveXML() throws(LibvirtError) -> String { try xml(0) }

    /// The persistent definition, secrets included (what a redefinition must start from).
    public func persistentXML() throws(LibvirtError) -> String {
        try xml(UInt32(VIR_DOMAIN_XML_INACTIVE.rawValue | VIR_DOMAIN_XML_SECURE.rawValue))
    }

    private func xml(_ flags: UInt32) throws(LibvirtError) -> String {
        guard let text = virDomainGetXMLDesc(domain, flags) else { throw LibvirtError("XML of \(name)") }
        defer { free(text) }
        return String(cString: text)
    }

    public var isActive: Bool { virDomainIsActive(domain) == 1 }
    public var isPersistent: Bool { virDomainIsPersistent(domain) == 1 }

    /// The state as virsh names it: "running", "paused", "shut off", …
    public func state() throws(LibvirtError) -> String {
        var state: Int32 = 0
        var reason: Int32 = 0
        guard virDomainGetState(domain, &state, &reason, 0) == 0 else { throw LibvirtError("state of \(name)") }
        switch UInt32(state) {
        case VIR_DOMAIN_NOSTATE.rawValue: return "no state"
        case VIR_DOMAIN_RUNNING.rawValue: return "running"
        case VIR_DOMAIN_BLOCKED.rawValue: return "idle"
        case VIR_DOMAIN_PAUSED.rawValue: return "paused"
        case VIR_DOMAIN_SHUTDOWN.rawValue: return "in shutdown"
        case VIR_DOMAIN_SHUTOFF.rawValue: return "shut off"
        case VIR_DOMAIN_CRASHED.rawValue: return "crashed"
        case VIR_DOMAIN_PMSUSPENDED.rawValue: return "pmsuspended"
        default: return "state \(state)"
        }
    }

    public func uuid() throws(LibvirtError) -> String {
        var buffer = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
        guard virDomainGetUUIDString(domain, &buffer) == 0 else { throw LibvirtError("UUID of \(name)") }
        return String(cString: buffer)
    }

    /// Pins every vCPU to `cpus`, in the running domain and its persistent definition (`<cputune><vcpupin>`).
    /// Returns how many vCPUs.
    public func pinVCPUs(to cpus: [Int]) throws(LibvirtError) -> Int {
        let count = virDomainGetVcpusFlags(domain, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue))
        guard count > 0 else { throw LibvirtError("vCPU count of \(name)") }
        var map = [UInt8](repeating: 0, count: ((cpus.max() ?? 0) / 8) + 1)
        for cpu in cpus where cpu >= 0 { map[cpu / 8] |= 1 << UInt8(cpu % 8) }
        let flags = UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue | VIR_DOMAIN_AFFECT_CONFIG.rawValue)
        for vcpu in 0..<UInt32(count) {
            guard virDomainPinVcpuFlags(domain, vcpu, &map, Int32(map.count), flags) == 0 else {
                throw LibvirtError("pin vCPU \(vcpu) of \(name) to CPUs \(cpus)")
            }
        }
        return Int(count)
    }
    /// Writes `<numatune><memory mode='preferred' nodeset='NODE'/></numatune>` into the persistent definition, so that
    /// the domain's next start (and libvirt's own later migrations of it) keep its RAM on `node`. Only the
    /// definition: libvirt changes a running domain's memory mode only through cgroups, and the pages of this one
    /// were already placed on `node` by the engine.
    public func preferNumaNode(_ node: Int) throws(LibvirtError) {
        guard isPersistent else { throw LibvirtError("\(name) has no persistent definition to write <numatune> into") }
        var params: UnsafeMutablePointer<virTypedParameter>?
        var count: Int32 = 0
        var capacity: Int32 = 0
        defer { virTypedParamsFree(params, count) }
        guard virTypedParamsAddString(&params, &count, &capacity, "numa_nodeset", "\(node)") == 0,
              virTypedParamsAddInt(&params, &count, &capacity, "numa_mode",
                                   Int32(VIR_DOMAIN_NUMATUNE_MEM_PREFERRED.rawValue)) == 0 else {
            throw LibvirtError("<numatune> parameters for \(name)")
        }
        guard virDomainSetNumaParameters(domain, params, count, UInt32(VIR_DOMAIN_AFFECT_CONFIG.rawValue)) == 0 else {
            throw LibvirtError("write <numatune> node \(node) into the definition of \(name)")
        }
    }
}

// DomainRequirements: what an enlightened migration needs of a libvirt domain's definition, item by item, and
// the edits that provide what is missing (`epcopy libvirt check` and `prepare`). Pure: XML in, findings or XML
// out; talking to libvirt is LibvirtConnection's job.
//
// What epcopy needs, and why (docs/libvirt.md says more):
//   - guest RAM in a shared file (`<memoryBacking><source type='file'/><access mode='shared'/>`): the source
//     engine maps that file, the destination's shim registers its mapping with a userfaultfd, and QEMU's own
//     stream then skips RAM (x-ignore-shared);
//   - 4 KiB pages and one RAM region (no hugepages, no guest NUMA cells or memory devices): what the engines move;
//   - epcopy's own monitor, a second QMP socket (`-qmp unix:…`): the source daemon watches the switch there, and
//     the destination daemon sets x-ignore-shared on the incoming QEMU once its engine holds the userfaultfd;
//   - the shim in QEMU's environment (`<qemu:env>`: LD_PRELOAD and where to hand the mapping over). It travels
//     with the definition to the destination. EPCOPY_SHIM_OPTIONAL lets a QEMU that no engine waits for (a
//     boot, libvirt's own migration) keep ordinary RAM: only an engine that took the uffd lets the destination
//     skip RAM, so an unregistered mapping is never left empty;
//   - optionally the guest agent's virtio-serial channel (`org.epcopy.agent.0`): without it the migration is
//     plain external post-copy, and says so.

import Foundation
import FoundationXML

/// One thing epcopy needs of a domain, as found.
public struct DomainCheckItem: Codable, Sendable, Equatable {
    public var name: String
    /// False: the migration runs without it (and says what it loses).
    public var required: Bool
    public var ok: Bool
    /// What the definition has now.
    public var found: String
    /// Why epcopy needs it.
    public var why: String
    /// The XML that provides it (nil when it is there, or when no edit can).
    public var fix: String?
}

public struct DomainCheck: Codable, Sendable {
    public var domain: String
    public var items: [DomainCheckItem]
    /// Every required item is there.
    public var migratable: Bool { items.allSatisfy { $0.ok || !$0.required } }

    enum CodingKeys: String, CodingKey { case domain, items, migratable }

    public init(domain: String, items: [DomainCheckItem]) {
        self.domain = domain
        self.items = items
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        domain = try c.decode(String.self, forKey: .domain)
        items = try c.decode([DomainCheckItem].self, forKey: .items)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(domain, forKey: .domain)
        try c.encode(items, forKey: .items)
        try c.encode(migratable, forKey: .migratable)
    }
}

public struct DomainRequirements: Sendable {
    public static let qemuNamespace = "http://libvirt.org/schemas/domain/qemu/1.0"
    public static let agentChannel = "org.epcopy.agent.0"
    /// A prefix of the paths of libvirt's file-backed guest RAM (qemu.conf `memory_backing_dir` and a slash, or a
    /// prefix common to every host's), the shim's EPCOPY_SHIM_PREFIX.
    public var memoryBackingDirectory: String
    /// The shim, libEpcopyPreload.so, as the destination host has it.
    public var shimLibrary: String
    /// Where epcopy's per-domain sockets live (libvirt's run directory for QEMU: on every host, local to it).
    public var socketDirectory = "/run/libvirt/qemu"

    public init(memoryBackingDirectory: String = "/var/lib/libvirt/qemu/ram/", shimLibrary: String) {
        self.memoryBackingDirectory = memoryBackingDirectory
        self.shimLibrary = shimLibrary
    }

    /// epcopy's monitor socket of the domain with this UUID (the same path on every host).
    public func monitorSocket(uuid: String) -> String { "\(socketDirectory)/epcopy-\(uuid).qmp" }
    /// Where the destination engine waits for the shim's hand-over.
    public func shimSocket(uuid: String) -> String { "\(socketDirectory)/epcopy-\(uuid).shim" }

    /// The environment the shim needs, in order.
    func shimEnvironment(uuid: String) -> [(String, String)] {
        [("LD_PRELOAD", shimLibrary), ("EPCOPY_SHIM_PREFIX", memoryBackingDirectory),
         ("EPCOPY_SHIM_SOCKET", shimSocket(uuid: uuid)), ("EPCOPY_SHIM_OPTIONAL", "1")]
    }

    func monitorArguments(uuid: String) -> [String] { ["-qmp", "unix:\(monitorSocket(uuid: uuid)),server=on,wait=off"] }

    /// The domain as epcopy finds it, item by item.
    public func check(xml text: String) throws -> DomainCheck {
        let domain = try Domain(text)
        var items: [DomainCheckItem] = []
        let source = domain.strings("/domain/memoryBacking/source/@type").first
        let access = domain.strings("/domain/memoryBacking/access/@mode").first
        let shared = source == "file" && access == "shared"
        items.append(DomainCheckItem(
            name: "memory in a shared file", required: true, ok: shared,
            found: "memoryBacking source \(source ?? "none"), access \(access ?? "default (private)")",
            why: "the engines move RAM through that file: the source maps it, the destination registers it with a userfaultfd",
            fix: shared ? nil : "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"))
        let huge = !domain.nodes("/domain/memoryBacking/hugepages").isEmpty
        items.append(DomainCheckItem(
            name: "4 KiB pages", required: true, ok: !huge, found: huge ? "hugepages" : "4 KiB pages",
            why: "epcopy moves 4 KiB pages of a shared-memory file", fix: nil))
        let cells = domain.nodes("/domain/cpu/numa/cell").count
        let dimms = domain.nodes("/domain/devices/memory").count
        items.append(DomainCheckItem(
            name: "one RAM region", required: true, ok: cells == 0 && dimms == 0,
            found: cells == 0 && dimms == 0 ? "one region" : "\(cells) guest NUMA cells, \(dimms) memory devices",
            why: "the engines move one RAM file per VM (guests with several NUMA nodes are not supported yet)", fix: nil))
        let uuid = domain.strings("/domain/uuid").first ?? "UUID"
        let arguments = domain.strings("/domain/*[local-name()='commandline']/*[local-name()='arg']/@value")
        let monitor = monitorArguments(uuid: uuid)
        let hasMonitor = arguments.indices.contains { Array(arguments[$0...].prefix(monitor.count)) == monitor }
        items.append(DomainCheckItem(
            name: "epcopy's monitor", required: true, ok: hasMonitor,
            found: hasMonitor ? monitor[1] : (arguments.isEmpty ? "no QEMU arguments" : "QEMU arguments \(arguments.joined(separator: " "))"),
            why: "a second QMP socket, epcopy's: the source watches the switch there, the destination sets x-ignore-shared once its engine holds the guest's memory",
            fix: hasMonitor ? nil : commandlineXML(arguments: monitor, environment: [])))
        let environment = domain.environment()
        let wanted = shimEnvironment(uuid: uuid)
        let missing = wanted.filter { environment[$0.0] != $0.1 }
        items.append(DomainCheckItem(
            name: "destination shim", required: true, ok: missing.isEmpty,
            found: missing.isEmpty ? "LD_PRELOAD=\(shimLibrary)"
                : "missing or different: " + missing.map { "\($0.0) (has \(environment[$0.0] ?? "nothing"))" }.joined(separator: ", "),
            why: "libvirt starts the incoming QEMU on the destination with this environment; the shim hands its RAM mapping to the engine there",
            fix: missing.isEmpty ? nil : commandlineXML(arguments: [], environment: missing)))
        let channel = !domain.nodes("/domain/devices/channel/target[@type='virtio' and @name='\(Self.agentChannel)']").isEmpty
        items.append(DomainCheckItem(
            name: "guest agent channel", required: false, ok: channel,
            found: channel ? Self.agentChannel : "no \(Self.agentChannel) channel",
            why: "the agent's hot and free reports order the push and skip free pages; without it the migration is plain external post-copy",
            fix: channel ? nil : agentChannelXML))
        return DomainCheck(domain: domain.strings("/domain/name").first ?? "?", items: items)
    }

    /// `text` with every missing item that an edit can provide added; returns it and the names of the items added.
    public func prepare(xml text: String) throws -> (xml: String, added: [String]) {
        let domain = try Domain(text)
        let before = try check(xml: text)
        let uuid = domain.strings("/domain/uuid").first ?? ""
        guard !uuid.isEmpty else { throw DomainXMLError("the domain has no <uuid>") }
        var added: [String] = []
        for item in before.items where !item.ok && item.fix != nil {
            switch item.name {
            case "memory in a shared file": domain.shareMemory()
            case "epcopy's monitor": domain.addCommandline(arguments: monitorArguments(uuid: uuid), environment: [])
            case "destination shim":
                let environment = domain.environment()
                domain.addCommandline(arguments: [], environment: shimEnvironment(uuid: uuid).filter { environment[$0.0] != $0.1 })
            case "guest agent channel": domain.addAgentChannel()
            default: continue
            }
            added.append(item.name)
        }
        return (domain.document.xmlString(options: [.nodePrettyPrint]), added)
    }

    private func commandlineXML(arguments: [String], environment: [(String, String)]) -> String {
        let lines = arguments.map { "  <qemu:arg value='\($0)'/>" } + environment.map { "  <qemu:env name='\($0.0)' value='\($0.1)'/>" }
        return "<domain … xmlns:qemu='\(Self.qemuNamespace)'> … <qemu:commandline>\n" + lines.joined(separator: "\n")
            + "\n</qemu:commandline>"
    }

    private var agentChannelXML: String {
        "<channel type='unix'><target type='virtio' name='\(Self.agentChannel)'/></channel> (in <devices>)"
    }
}

public struct DomainXMLError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// A domain definition being read or edited.
private final class Domain {
    let document: XMLDocument
    var root: XMLElement { document.rootElement()! }

    init(_ text: String) throws {
        // XMLDocument recovers from errors (a truncated definition parses); the strict parser says first.
        let strict = XMLParser(data: Data(text.utf8))
        let depth = ElementDepth()
        strict.delegate = depth
        guard strict.parse(), depth.closed else {
            let reason = strict.parserError.map { "\($0.localizedDescription)" } ?? "not well-formed"
            throw DomainXMLError("the domain XML does not parse (line \(strict.lineNumber)): \(reason)")
        }
        do { document = try XMLDocument(xmlString: text, options: []) } catch {
            throw DomainXMLError("the domain XML does not parse: \(error)")
        }
        guard document.rootElement()?.name == "domain" else { throw DomainXMLError("not a domain definition (no <domain>)") }
    }

    func nodes(_ path: String) -> [XMLNode] { (try? document.nodes(forXPath: path)) ?? [] }
    func strings(_ path: String) -> [String] { nodes(path).compactMap { $0.stringValue } }

    /// `<qemu:env>` entries, name → value.
    func environment() -> [String: String] {
        var result: [String: String] = [:]
        for case let env as XMLElement in nodes("/domain/*[local-name()='commandline']/*[local-name()='env']") {
            if let name = env.attribute(forName: "name")?.stringValue { result[name] = env.attribute(forName: "value")?.stringValue ?? "" }
        }
        return result
    }

    private func child(_ parent: XMLElement, _ name: String) -> XMLElement {
        if let existing = parent.elements(forName: name).first { return existing }
        let element = XMLElement(name: name)
        parent.addChild(element)
        return element
    }

    private func set(_ element: XMLElement, _ attribute: String, _ value: String) {
        element.removeAttribute(forName: attribute)
        element.addAttribute(XMLNode.attribute(withName: attribute, stringValue: value) as! XMLNode)
    }

    func shareMemory() {
        let backing = child(root, "memoryBacking")
        set(child(backing, "source"), "type", "file")
        set(child(backing, "access"), "mode", "shared")
    }

    func addCommandline(arguments: [String], environment: [(String, String)]) {
        if root.namespace(forPrefix: "qemu") == nil {
            root.addNamespace(XMLNode.namespace(withName: "qemu", stringValue: DomainRequirements.qemuNamespace) as! XMLNode)
        }
        let commandline = child(root, "qemu:commandline")
        for argument in arguments {
            let element = XMLElement(name: "qemu:arg")
            set(element, "value", argument)
            commandline.addChild(element)
        }
        for (name, value) in environment {
            for case let old as XMLElement in commandline.elements(forName: "qemu:env")
            where old.attribute(forName: "name")?.stringValue == name {
                old.detach()
            }
            let element = XMLElement(name: "qemu:env")
            set(element, "name", name)
            set(element, "value", value)
            commandline.addChild(element)
        }
    }

    func addAgentChannel() {
        let devices = child(root, "devices")
        let channel = XMLElement(name: "channel")
        set(channel, "type", "unix")
        let target = XMLElement(name: "target")
        set(target, "type", "virtio")
        set(target, "name", DomainRequirements.agentChannel)
        channel.addChild(target)
        devices.addChild(channel)
    }
}

/// Counts open elements while XMLParser reads: a document that ends inside one is cut short (corelibs' parser
/// reports success for it).
private final class ElementDepth: NSObject, XMLParserDelegate {
    private var depth = 0
    private var seen = false
    var closed: Bool { seen && depth == 0 }
    func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?,
                qualifiedName qName: String?, attributes attributeDict: [String: String] = [:]) {
        depth += 1
        seen = true
    }
    func parser(_ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName qName: String?) {
        depth -= 1
    }
}

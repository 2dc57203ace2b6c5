// DomainDevices: where a running libvirt domain's devices are on this host, read from its live XML — the file
// its serial console is logged to (the memory tester's lines, for the guest's verdict), the socket libvirt
// bound for the guest agent's channel, and the size of its RAM. Pure: XML in, paths out.

import Foundation
import FoundationXML

public struct DomainDevices: Sendable, Equatable {
    /// `<serial>`'s (or `<console>`'s) `<log file=…>`.
    public var serialLog: String?
    /// The host end of the `org.epcopy.agent.0` channel.
    public var agentSocket: String?
    /// `<memory>`, in bytes (libvirt writes it in KiB in the live XML).
    public var memoryBytes: UInt64?
    /// The first host node of `<numatune><memory nodeset=…>`: where the domain asks its RAM to be, on any host.
    public var numaNode: Int?

    public init(liveXML text: String) throws {
        let document: XMLDocument
        do { document = try XMLDocument(xmlString: text, options: []) } catch {
            throw DomainXMLError("the domain XML does not parse: \(error)")
        }
        func first(_ path: String) -> String? { ((try? document.nodes(forXPath: path)) ?? []).first?.stringValue }
        serialLog = first("/domain/devices/serial/log/@file") ?? first("/domain/devices/console/log/@file")
        agentSocket = first("/domain/devices/channel[target/@name='\(DomainRequirements.agentChannel)']/source/@path")
        numaNode = first("/domain/numatune/memory/@nodeset").flatMap { NumaTopology.parseCPUList($0)?.first }
        let scales: [String: UInt64] = ["b": 1, "bytes": 1, "KiB": 1 << 10, "k": 1 << 10, "MiB": 1 << 20, "M": 1 << 20,
                                        "GiB": 1 << 30, "G": 1 << 30]
        if let value = first("/domain/memory").flatMap({ UInt64($0.trimmingCharacters(in: .whitespaces)) }),
           let scale = scales[first("/domain/memory/@unit") ?? "KiB"], value < (1 << 34) {
            memoryBytes = value * scale
        }
    }

    /// The serial log's contents so far ("" when there is none, or it cannot be read).
    public func readSerialLog() -> String {
        guard let serialLog, let data = FileManager.default.contents(atPath: serialLog) else { return "" }
        return String(decoding: data, as: UTF8.self)
    }
}

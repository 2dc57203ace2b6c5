// `epcopy engine source|destination`: one side of a memory transfer as its own process. These are the
// engine roles that `epcopy migrate` drives; run by hand (or by tests) they move a RAM file between
// two hosts with the destination's memory served through userfaultfd.

import ArgumentParser
import EpcopyHostEngine
import EpcopyProtocol
import Foundation

struct Engine: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one side of a RAM transfer (the roles `migrate` uses), for operators and tests.",
        subcommands: [EngineSource.self, EngineDestination.self]
    )
}

/// The shared key both engines prove they hold before any page moves.
struct KeyOptions: ParsableArguments {
    @Option(help: "File with the shared key (at least 16 bytes; keep it mode 0600). Without it the engines do not authenticate.")
    var keyFile: String?

    func key() throws -> [UInt8]? {
        guard let keyFile else { return nil }
        guard let data = FileManager.default.contents(atPath: keyFile) else {
            throw ValidationError("--key-file: cannot read \(keyFile)")
        }
        guard data.count >= 16 else { throw ValidationError("--key-file: \(keyFile) holds \(data.count) bytes; use at least 16") }
        return [UInt8](data)
    }
}

/// Link emulation options shared by both roles.
struct LinkOptions: ParsableArguments {
    @Option(help: "Cap the link at this rate, e.g. 1gbit or 10gbit (emulated in user space).")
    var rate: String?
    @Option(help: "Emulate this round-trip time, e.g. 2ms (half is added in each direction).")
    var rtt: String?

    func spec() throws -> LinkSpec {
        var link = LinkSpec()
        if let rate {
            guard let r = LinkSpec.parseRate(rate) else { throw ValidationError("--rate: expected e.g. 1gbit, got \(rate)") }
            link.bytesPerSecond = r
        }
        if let rtt {
            guard let d = LinkSpec.parseDuration(rtt) else { throw ValidationError("--rtt: expected e.g. 2ms, got \(rtt)") }
            link.delayNanos = d / 2
        }
        return link
    }
}

func parseEndpoint(_ text: String, option: String) throws -> Endpoint {
    guard let endpoint = Endpoint(text) else {
        throw ValidationError("\(option): expected IPv4-ADDRESS:PORT, e.g. 10.0.0.2:7070, got \(text)")
    }
    return endpoint
}

struct EngineSource: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "source",
        abstract: "Send a stopped VM's RAM file to a destination engine, then release it.",
        discussion: """
            The RAM file must be final (the VM stopped and never resumed here). Holes in it are never sent; \
            every acknowledged page is punched out of the file, so the source host gets memory back while \
            the transfer runs.
            """
    )

    @Option(name: .customLong("ram-file"), help: "The VM's RAM file, e.g. /dev/shm/vm1.") var ramFile: String
    @Option(help: "Destination engine, IPv4-ADDRESS:PORT.") var to: String
    @Option(help: "Session id shared with the destination.") var session: UInt64
    @Option(help: "VM name (letters, digits, '.', '_', '-').") var vm = "vm"
    @Option(help: "Seconds to wait for a destination engine that went away to come back (0: fail at once).")
    var reconnectTimeout: Double = 0
    @Flag(help: "Do not punch sent pages out of the RAM file (keeps the source intact, for comparisons).")
    var keepSource = false
    @OptionGroup var link: LinkOptions
    @OptionGroup var keys: KeyOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        let endpoint = try parseEndpoint(to, option: "--to")
        let options = SourceOptions(sessionID: session, vmName: vm, link: try link.spec(),
                                    reconnectTimeoutMillis: Int32(reconnectTimeout * 1000),
                                    releaseMemory: !keepSource, authKey: try keys.key())
        do {
            let engine = try SourceEngine(ramFile: ramFile, options: options)
            let report = try engine.run(destination: endpoint)
            if output.json {
                print(try JSONOutput.string(report))
            } else {
                print(String(format: "sent %llu pages (%llu urgent), %llu holes never sent, %llu bytes on the wire; "
                             + "T_release %.1f ms", report.pagesPushed + report.pagesUrgent, report.pagesUrgent,
                             report.pagesZero, report.bytesWire, report.tReleaseMillis))
            }
        } catch let error as PeerError {
            throw CLIError("source engine: \(error)")
        }
    }
}

struct EngineDestination: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "destination",
        abstract: "Serve a running VM's memory faults and receive its RAM from a source engine.",
        discussion: """
            Guest memory comes from the LD_PRELOAD shim in the process that owns it (--handover-socket: start \
            that process with LD_PRELOAD=libEpcopyPreload.so, EPCOPY_SHIM_SOCKET=<socket> and \
            EPCOPY_SHIM_PREFIX=<RAM file path>), or from a previous engine that died (--take-over STATE). \
            With --state the engine records what a replacement needs to take over.
            """
    )

    @Option(help: "Address to accept the source on, IPv4-ADDRESS:PORT.") var listen: String
    @Option(help: "Session id shared with the source.") var session: UInt64
    @Option(help: "Unix socket on which to accept guest memory from the shim.") var handoverSocket: String?
    @Option(help: "Seconds to wait for the shim's hand-over.") var handoverTimeout: Double = 30
    @Option(help: "Write the takeover state here once guest memory is handed over.") var state: String?
    @Option(help: "Take over guest memory described by this state file (after an engine died).")
    var takeOver: String?
    @Option(help: "Write the transfer timeline here as JSON lines (t_ms, pages_present, bytes, faults every 100 ms).")
    var timeline: String?
    @OptionGroup var link: LinkOptions
    @OptionGroup var keys: KeyOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard (handoverSocket == nil) != (takeOver == nil) else {
            throw ValidationError("give exactly one of --handover-socket and --take-over")
        }
    }

    func run() throws {
        let endpoint = try parseEndpoint(listen, option: "--listen")
        let listener: Listener
        do { listener = try TCP.listen(on: endpoint) } catch {
            throw CLIError("destination engine: listen on \(endpoint): \(error)")
        }
        var present = PageSet<PageIndex>()
        let memory: DestinationMemory
        if let socket = handoverSocket {
            do {
                let handoverListener = try UffdHandoverListener(path: socket)
                log("destination engine: waiting for guest memory on \(socket), source on \(listener.endpoint)")
                let handover = try handoverListener.accept(timeout: .milliseconds(Int(handoverTimeout * 1000)))
                if let state {
                    try DestinationState(pid: handover.pid, remoteUffdFD: handover.remoteUffdFD,
                                         hostAddress: handover.hostVirtualAddress, length: handover.length,
                                         fileOffset: handover.fileOffset, path: handover.path,
                                         sessionID: session).write(to: state)
                }
                memory = try DestinationMemory(handover: handover)
            } catch {
                throw CLIError("destination engine: hand-over of guest memory failed: \(error)")
            }
        } else {
            do {
                let saved = try DestinationState.read(from: takeOver!)
                guard saved.sessionID == session else {
                    throw CLIError("--take-over: the state is for session \(saved.sessionID), not \(session)")
                }
                memory = try DestinationMemory.takeOver(saved, present: &present)
                log("destination engine: took over pid \(saved.pid)'s guest memory; \(present.count) pages already here")
            } catch let error as CLIError { throw error } catch {
                throw CLIError("destination engine: takeover failed: \(error)")
            }
        }
        let engine = DestinationEngine(memory: memory, options: DestinationOptions(
            sessionID: session, link: try link.spec(), initiallyPresent: present, authKey: try keys.key()))
        do {
            let report = try engine.run(listener: listener)
            if let timeline {
                try (report.timeline.joined(separator: "\n") + "\n").write(toFile: timeline, atomically: true,
                                                                          encoding: .utf8)
            }
            if output.json {
                print(try JSONOutput.string(report))
            } else {
                print(String(format: "received %llu pages (%llu zero never sent) in %.1f ms; %llu faults "
                             + "(p50 %llu µs, p99 %llu µs)", report.pagesReceived, report.pagesZero,
                             report.transferMillis, report.metrics.faults, report.metrics.faultP50Micros,
                             report.metrics.faultP99Micros))
            }
        } catch {
            throw CLIError("destination engine: \(error)")
        }
    }

    private func log(_ text: String) { Log.engine.info("\(text)") }
}

/// An error whose text is the whole message a user sees.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

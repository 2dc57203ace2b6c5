// `epcopy serve`, `epcopy vm …` and `epcopy migrate`: the daemon and the commands that talk to it.

import ArgumentParser
import EpcopyHostEngine
import Foundation

/// Where the daemon is and the key that opens it.
struct DaemonOptions: ParsableArguments {
    @Option(help: "The epcopy daemon to talk to, IPv4-ADDRESS:PORT.") var daemon = "127.0.0.1:7470"
    @Option(help: "The host's shared key file (or EPCOPY_KEY_FILE).") var keyFile: String?

    func key() throws -> [UInt8] {
        guard let path = keyFile ?? ProcessInfo.processInfo.environment["EPCOPY_KEY_FILE"] else {
            throw ValidationError("give --key-file (or set EPCOPY_KEY_FILE): daemons only talk to key holders")
        }
        guard let data = FileManager.default.contents(atPath: path), data.count >= 16 else {
            throw ValidationError("--key-file: \(path) is missing or shorter than 16 bytes")
        }
        return [UInt8](data)
    }

    func connect() throws -> ControlChannel {
        let endpoint = try parseEndpoint(daemon, option: "--daemon")
        let channel = try ControlChannel.connect(endpoint)
        try channel.authenticateAsClient(key: try key())
        return channel
    }

    func request(_ object: [String: Any], timeoutMillis: Int32 = 120_000) throws -> [String: Any] {
        do {
            let channel = try connect()
            try channel.send(object)
            return try channel.receive(timeoutMillis: timeoutMillis)
        } catch let error as ControlError {
            throw CLIError("\(error)")
        }
    }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run this host's epcopy daemon: start VMs, and send or receive migrations.",
        discussion: """
            One daemon per host. Every peer and client must prove it holds the shared key (HMAC-SHA256 \
            challenge-response); others are refused. VMs started through the daemon are bounded by \
            --vm-deadline and killed when the daemon exits.
            """
    )

    @Option(help: "Address to listen on, IPv4-ADDRESS:PORT (migrations to this host use the same address).")
    var listen = "127.0.0.1:7470"
    @Option(help: "The shared key file (at least 16 bytes).") var keyFile: String
    @Option(help: "Seconds after which a VM started here is killed.") var vmDeadline: Double = 3600
    @Option(help: "Exit (killing this daemon's VMs) after this many seconds; default: run until SIGTERM.")
    var maxLifetime: Double?
    @Option(help: ArgumentHelp(
        "Ask each VM's guest agent for a hot report this often, in the background (0: only when migrating).",
        discussion: "A migration then starts from the latest report (if at most 30 s old) instead of waiting "
            + "for a scan of guest memory at the moment the host is busiest; the report only orders the push, so "
            + "a few seconds of age cost nothing in correctness. Each report costs the guest one scan of its "
            + "page flags.", valueName: "seconds"))
    var hotReportEvery: Double = 10
    @OptionGroup var link: LinkOptions

    func run() throws {
        let endpoint = try parseEndpoint(listen, option: "--listen")
        guard let data = FileManager.default.contents(atPath: keyFile), data.count >= 16 else {
            throw ValidationError("--key-file: \(keyFile) is missing or shorter than 16 bytes")
        }
        let preload = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
            .appendingPathComponent("libEpcopyPreload.so").path
        guard hotReportEvery == 0 || (1...3600).contains(hotReportEvery) else {
            throw ValidationError("--hot-report-every: 0 (off) or 1-3600 seconds")
        }
        var daemonOptions = EpcopyHostEngine.DaemonOptions(
            listen: endpoint, key: [UInt8](data), preloadLibrary: preload, vmDeadlineSeconds: vmDeadline,
            link: try link.spec())
        daemonOptions.hotReportEveryMillis = UInt64(hotReportEvery * 1000)
        let daemon = Daemon(options: daemonOptions)
        let listener: Listener
        do { listener = try TCP.listen(on: endpoint) } catch { throw CLIError("listen on \(endpoint): \(error)") }
        // SIGTERM/SIGINT: stop accepting, kill our VMs, exit.
        for sig in [SIGTERM, SIGINT] { signal(sig, SIG_IGN) }
        let stop = StopFlag()
        let sources = [SIGTERM, SIGINT].map { sig -> DispatchSourceSignal in
            let source = DispatchSource.makeSignalSource(signal: sig)
            source.setEventHandler { stop.set() }
            source.resume()
            return source
        }
        FileHandle.standardError.write(Data("epcopy serve: listening on \(listener.endpoint)\n".utf8))
        let deadline = maxLifetime.map { Date().addingTimeInterval($0) }
        daemon.serve(listener: listener, shouldStop: { stop.isSet || deadline.map { Date() > $0 } ?? false })
        withExtendedLifetime(sources) {}
    }
}

final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

struct VM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm", abstract: "Start, list and stop VMs managed by an epcopy daemon.",
        subcommands: [VMStart.self, VMList.self, VMStop.self, VMSerial.self])
}

struct VMStart: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "start", abstract: "Start a VM under a daemon (RAM in a shared /dev/shm file, agent port, QMP).")
    @Argument(help: "VM name.") var name: String
    @Option(help: "Guest memory in MiB.") var memory = 512
    @Option(help: "Guest kernel (default: the test guest built by `make guest`).")
    var kernel = "Workloads/guest/out/vmlinux"
    @Option(help: "Guest initrd.") var initrd = "Workloads/guest/out/initrd.img"
    @Option(help: "Kernel command line.") var append = "console=ttyS0 quiet epcopy.memtest_mib=128"
    @Option(help: ArgumentHelp("A qcow2 disk on storage both hosts see (e.g. an overlay of Workloads/images/out/bench.img).",
                               discussion: "Both QEMUs of a migration open it; epcopy never deletes it."))
    var disk: String?
    @Option(name: .customLong("forward"), help: "Guest TCP port to reach at the daemon's address (repeatable).")
    var forwards: [UInt16] = []
    @OptionGroup var daemon: DaemonOptions

    func run() throws {
        let absolute = { (path: String) in URL(fileURLWithPath: path).standardizedFileURL.path }
        var spec: [String: Any] = ["name": name, "memoryMiB": memory, "vcpus": 1, "kernel": absolute(kernel),
                                   "initrd": absolute(initrd), "append": append, "accel": QEMUConfig.defaultAccel()]
        if let disk { spec["disk"] = absolute(disk) }
        if !forwards.isEmpty { spec["forwards"] = forwards.map { Int($0) } }
        let reply = try daemon.request(["op": "vm.start", "name": name, "spec": spec])
        print("started \(name): pid \(reply["pid"] ?? "?"), RAM in \(reply["ram_file"] ?? "?")")
    }
}

struct VMList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List a daemon's VMs.")
    @OptionGroup var daemon: DaemonOptions
    func run() throws {
        let reply = try daemon.request(["op": "vm.list"])
        for vm in reply["vms"] as? [[String: Any]] ?? [] {
            print("\(vm["name"] ?? "?")\tpid \(vm["pid"] ?? "?")\t\(vm["memory_mib"] ?? "?") MiB\t"
                  + ((vm["running"] as? Bool) == true ? "running" : "stopped"))
        }
    }
}

struct VMStop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop a VM and free its memory.")
    @Argument var name: String
    @OptionGroup var daemon: DaemonOptions
    func run() throws { _ = try daemon.request(["op": "vm.stop", "name": name]) }
}

struct VMSerial: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serial", abstract: "Print the end of a VM's serial console.")
    @Argument var name: String
    @OptionGroup var daemon: DaemonOptions
    func run() throws { print(try daemon.request(["op": "vm.serial", "name": name])["log"] as? String ?? "") }
}

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a VM from its daemon to another host's daemon.",
        discussion: """
            enlightened: QEMU moves device state only (x-ignore-shared) and the guest runs on the destination \
            at once; epcopy's engines move RAM (faults first). postcopy and precopy drive QEMU's own migration \
            over the same hosts, as baselines. --verify compares every page the destination placed with the \
            source's page at STOP (enlightened), and reads the guest's own verdict (all modes).

            Enlightened mode asks the guest agent (epcopy-agent, on the org.epcopy.agent.0 port) for a hot report \
            before the switch — kernel pages, recently used, other in-use, believed free — and pushes in that \
            order; right after RESUME the destination agent reports free pages, which are then never sent. \
            Without an agent answering within --agent-timeout-ms the migration is plain external post-copy with \
            neighbour prefetch, and the output says so (enlightened: false).
            """
    )
    @Argument(help: "VM name.") var name: String
    @Option(help: "Destination daemon, IPv4-ADDRESS:PORT.") var to: String
    @Option(help: "enlightened, postcopy or precopy.") var mode = "enlightened"
    @Flag(help: "Verify destination memory against the source at STOP.") var verify = false
    @Flag(help: "Do not ask the guest agent (plain external post-copy).") var noAgent = false
    @Option(help: "How long to wait for each guest agent report, in ms.") var agentTimeoutMs = 3000
    @OptionGroup var daemon: DaemonOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard MigrationMode(rawValue: mode) != nil else { throw ValidationError("--mode: enlightened, postcopy or precopy") }
        guard (1...60_000).contains(agentTimeoutMs) else { throw ValidationError("--agent-timeout-ms: 1...60000") }
        _ = try parseEndpoint(to, option: "--to")
    }

    func run() throws {
        let showProgress = !output.json && isatty(STDOUT_FILENO) != 0
        let result: [String: Any]
        do {
            let channel = try daemon.connect()
            try channel.send(["op": "migrate", "name": name, "to": to, "mode": mode, "verify": verify,
                              "agent": !noAgent, "agent_timeout_ms": agentTimeoutMs])
            var reply = try channel.receive(timeoutMillis: 3_600_000)
            while let progress = reply["progress"] as? [String: Any] {
                if showProgress { ProgressBar.draw(progress, label: "\(name) → \(to) (\(mode))") }
                reply = try channel.receive(timeoutMillis: 3_600_000)
            }
            if showProgress { print("") }
            guard let r = reply["result"] as? [String: Any] else { throw CLIError("the daemon returned no result") }
            result = r
        } catch let error as ControlError {
            if showProgress { print("") }
            throw CLIError("\(error)")
        }
        if output.json {
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys, .prettyPrinted])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(MigrationTable.header)
            print(MigrationTable.row(result))
            if let line = MigrationTable.agentLine(result) { print(line) }
        }
        if (result["mismatched_pages"] as? Int ?? 0) != 0 || (result["guest_verdict"] as? String) != "OK" {
            throw ExitCode(1)
        }
    }
}

enum MigrationTable {
    static let header = "mode         downtime_ms  t_release_ms  bytes_wire   faults  before_resume  compared  mismatched  guest"
    static func row(_ r: [String: Any]) -> String {
        func n(_ key: String) -> Double { (r[key] as? NSNumber)?.doubleValue ?? 0 }
        return String(format: "%-12@ %11.1f  %12.1f  %10.0f  %7.0f  %13.0f  %8.0f  %10.0f  %@",
                      (r["mode"] as? String ?? "?") as NSString, n("downtime_ms"), n("t_release_ms"), n("bytes_wire"),
                      n("faults"), n("faults_before_resume"), n("pages_compared"), n("mismatched_pages"),
                      (r["guest_verdict"] as? String ?? "?") as NSString)
    }
}

extension MigrationTable {
    /// What the guest agent contributed, in words (enlightened mode only).
    static func agentLine(_ r: [String: Any]) -> String? {
        guard r["mode"] as? String == "enlightened", let enlightened = r["enlightened"] as? Bool else { return nil }
        let notes = (r["agent_notes"] as? [String] ?? []).joined(separator: "; ")
        guard enlightened else {
            return "no guest agent answered: plain external post-copy with neighbour prefetch"
                + (notes.isEmpty ? "" : " (\(notes))")
        }
        var parts: [String] = []
        if let age = r["agent_report_age_ms"] as? NSNumber {
            parts.append(String(format: "hot report kept in the background (%.1f s old)", age.doubleValue / 1000))
        } else if let ms = r["agent_report_ms"] as? NSNumber {
            parts.append(String(format: "hot report %.1f ms", ms.doubleValue))
        }
        if let classes = r["pages_by_class"] as? [String: Any] {
            let order = ["device", "kernel", "recent", "in_use", "believed_free", "unclassified"]
            parts.append("pushed " + order.compactMap { k in (classes[k] as? NSNumber).map { "\(k) \($0)" } }.joined(separator: ", "))
        }
        if let free = r["pages_reported_free"] as? NSNumber, let ms = r["free_scan_ms"] as? NSNumber {
            parts.append(String(format: "free scan %.1f ms: %d pages free", ms.doubleValue, free.intValue))
        }
        if let skipped = r["pages_skipped_free"] as? NSNumber { parts.append("\(skipped) never sent") }
        if !notes.isEmpty { parts.append("notes: \(notes)") }
        return "guest agent: " + parts.joined(separator: "; ")
    }
}

/// One line, redrawn in place: how much of the VM's memory has moved.
enum ProgressBar {
    static func draw(_ progress: [String: Any], label: String) {
        let moved = (progress["bytes"] as? NSNumber)?.doubleValue ?? 0
        let total = max((progress["total"] as? NSNumber)?.doubleValue ?? 1, 1)
        let fraction = min(moved / total, 1)
        let width = 30
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        let text = String(format: "\r%@ [%@] %3.0f%%  %.0f / %.0f MiB", label, bar, fraction * 100,
                          moved / 1_048_576, total / 1_048_576)
        FileHandle.standardOutput.write(Data(text.utf8))
    }
}

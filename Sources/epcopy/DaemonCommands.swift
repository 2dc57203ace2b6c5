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
        return try ControlChannel.connect(endpoint, key: try key())
    }

    func request(_ request: ControlRequest, timeoutMillis: Int32 = 120_000) throws -> ControlReply {
        do {
            let channel = try connect()
            try channel.send(request)
            return try channel.receiveReply(timeoutMillis: timeoutMillis)
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
            --vm-deadline and killed when the daemon exits on SIGTERM or SIGINT; a daemon that dies otherwise \
            (SIGKILL, a crash) leaves them running for the next one started with the same --state-dir.
            """
    )

    @Option(help: "Address to listen on, IPv4-ADDRESS:PORT (migrations to this host use the same address).")
    var listen = "127.0.0.1:7470"
    @Option(name: .customLong("also-listen"), help: ArgumentHelp(
        "Another address of this host to accept peers and clients on, IPv4-ADDRESS:PORT (repeatable).",
        discussion: "A second network path: a source whose link to --listen broke can be sent here by hand "
            + "(`epcopy migrate NAME --resume --to ADDR` on the source host)."))
    var alsoListen: [String] = []
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
    @Option(help: ArgumentHelp(
        "Where this daemon's VMs and migrations are recorded (default: /var/lib/epcopy/<instance>).",
        discussion: "Its VMs outlive the daemon (each QEMU runs behind a keeper that holds --vm-deadline). A daemon "
            + "restarted with the same directory takes them back, finishes every switched migration it finds there "
            + "(the fenced RAM file still holds what the destination lacks), calls off those that had not switched, "
            + "and adopts the QEMUs of migrations it was receiving.", valueName: "dir"))
    var stateDir: String?
    @Option(help: ArgumentHelp(
        "The libvirt daemon of this host, e.g. qemu:///system: its domains can be migrated (migrate --libvirt) and received.",
        discussion: "The domain stays libvirt's on both hosts: libvirt moves it peer to peer, defines it on the "
            + "destination and undefines it on the source (unless migrate --keep-source-definition).",
        valueName: "uri"))
    var libvirt: String?
    @Option(name: .customLong("libvirt-migrate-uri"), help: ArgumentHelp(
        "How other hosts' libvirt daemons reach this host's, for a peer-to-peer migration (default: qemu+tcp://<--listen address>/system).",
        valueName: "uri"))
    var libvirtMigrateURI: String?
    @Option(name: .customLong("libvirt-ram-prefix"), help: ArgumentHelp("Where this host's libvirt puts file-backed guest RAM: qemu.conf's memory_backing_dir and a slash (what `epcopy libvirt check --ram-prefix` checks for).",
                               valueName: "prefix"))
    var libvirtRAMPrefix = "/var/lib/libvirt/qemu/ram/"
    @Option(name: .customLong("numa-node"), help: ArgumentHelp(
        "The NUMA node for the RAM of guests received here in enlightened mode: auto, a node number, or none.",
        discussion: "auto takes the node with the most free memory of those that can hold the guest. The RAM file is "
            + "bound (MPOL_PREFERRED) before the first page lands; the result's numa_node and pages_on_node_fraction "
            + "say where the pages are after the move. A migration's own --numa-node overrides this.",
        valueName: "node"))
    var numaNode = "auto"
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
        if let stateDir { daemonOptions.stateDirectory = stateDir }
        daemonOptions.libvirtURI = libvirt
        daemonOptions.libvirtMigrateURI = libvirtMigrateURI
        daemonOptions.libvirtRAMPrefix = libvirtRAMPrefix
        if numaNode == "none" {
            daemonOptions.numa = nil
        } else {
            guard let numa = NumaRequest(numaNode) else { throw ValidationError("--numa-node: auto, a node number, or none") }
            daemonOptions.numa = numa
        }
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
        let serving = listener.endpoint  // the log message is an autoclosure: it must not capture the listener
        Log.logger("daemon").info("listening on \(serving)")
        let deadline = maxLifetime.map { Date().addingTimeInterval($0) }
        let shouldStop: @Sendable () -> Bool = { stop.isSet || deadline.map { Date() > $0 } ?? false }
        for text in alsoListen {
            let also = try parseEndpoint(text, option: "--also-listen")
            do { try daemon.serveAlso(on: also, shouldStop: shouldStop) } catch { throw CLIError("listen on \(also): \(error)") }
            Log.logger("daemon").info("listening on \(also) too")
        }
        daemon.serve(listener: listener, shouldStop: shouldStop)
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
        var spec = VMSpec(name: name, memoryMiB: memory, kernel: absolute(kernel), initrd: absolute(initrd),
                          append: append)
        spec.disk = disk.map(absolute)
        spec.forwards = forwards.isEmpty ? nil : forwards
        guard case .started(_, let pid, let ramFile) = try daemon.request(.vmStart(name: name, spec: spec)) else {
            throw CLIError("the daemon answered vm start with something else")
        }
        print("started \(name): pid \(pid), RAM in \(ramFile)")
    }
}

struct VMList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List a daemon's VMs.")
    @OptionGroup var daemon: DaemonOptions
    func run() throws {
        guard case .vms(let vms) = try daemon.request(.vmList) else {
            throw CLIError("the daemon answered vm list with something else")
        }
        for vm in vms.sorted(by: { $0.name < $1.name }) {
            print("\(vm.name)\tpid \(vm.pid)\t\(vm.memoryMiB) MiB\t" + (vm.running ? "running" : "stopped"))
        }
    }
}

struct VMStop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop a VM and free its memory.")
    @Argument var name: String
    @OptionGroup var daemon: DaemonOptions
    func run() throws { _ = try daemon.request(.vmStop(name: name)) }
}

struct VMSerial: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serial", abstract: "Print the end of a VM's serial console.")
    @Argument var name: String
    @OptionGroup var daemon: DaemonOptions
    func run() throws {
        guard case .serial(let log) = try daemon.request(.vmSerial(name: name)) else {
            throw CLIError("the daemon answered vm serial with something else")
        }
        print(log)
    }
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

            After the switch the guest's memory is split between the two hosts until the last page has moved \
            (T_release). If the link between the engines breaks meanwhile — a reset, or a black hole noticed \
            after --keepalive-timeout-ms of silence — both engines reconnect by themselves for up to \
            --reconnect-deadline seconds: the guest keeps running on the pages it has, a vCPU that faults on a \
            missing page waits (it never reads a zero page), the destination tells the source exactly which pages \
            it holds, and the transfer goes on. The progress line shows the outage; --json reports link_losses, \
            recovered and paused_ms.

            If a daemon itself dies (SIGKILL, a crash), restart it with the same --state-dir: the VMs outlive \
            it. A source daemon takes its VMs back; a migration that had switched goes on from the fenced RAM \
            file (the destination waits for it meanwhile), and `epcopy migrate NAME --resume` on the restarted \
            daemon prints the result as this command would have; one that had not is called off and the VM \
            keeps running on the source. A destination daemon adopts the QEMU it was receiving (and its \
            userfaultfd) and the transfer goes on. A failure before the switch leaves the VM where it runs, and \
            this command says so: run it again.

            When the destination host has other addresses (second paths; its daemon started with \
            --also-listen on each), give them with --also-to: when the link stays down on one address for \
            --failover-after seconds, the engines and the control link move to the next by themselves, and go \
            round them until one answers or the reconnect deadline ends (the deadline is not renewed by a \
            move). A switched migration can also be sent to an address by hand: `epcopy migrate NAME --resume \
            --to ADDR:PORT` redirects the engines and the control link at once (the reconnect deadline starts \
            again) and waits for the result.

            What cannot be recovered: the source host itself lost (power, kernel panic) after the switch and \
            before T_release. Its RAM file holds the only copy of the pages not yet moved, so the VM is lost; \
            the exposure window is T_release, which every migration reports (t_release_ms).
            """
    )
    @Argument(help: "VM name.") var name: String
    @Option(help: "Destination daemon, IPv4-ADDRESS:PORT.") var to: String?
    @Option(help: ArgumentHelp("Another address of the same destination daemon (another path to its host), IPv4-ADDRESS:PORT; repeat for more.",
                               discussion: "Enlightened mode. Its engine is reached on that host part at the same engine port."))
    var alsoTo: [String] = []
    @Option(help: "With --also-to: how long the link may stay down on one address before the next is tried, in seconds.")
    var failoverAfter: Double = 2
    @Flag(help: ArgumentHelp("NAME is a libvirt domain of the daemon's libvirt (serve --libvirt): the libvirt daemons move it.",
                             discussion: "Enlightened mode: libvirt's own migration (peer to peer, live) carries the definition and the device state, epcopy's engines carry the RAM (--verify compares every page); it needs what `epcopy libvirt check NAME` lists. postcopy and precopy are libvirt's own migrations. Either way the domain ends up defined and running on the destination's libvirt and, unless --keep-source-definition, undefined on the source."))
    var libvirt = false
    @Flag(help: "With --libvirt: keep the domain defined (shut off) on the source host.") var keepSourceDefinition = false
    @Flag(help: ArgumentHelp("Call off the migration of NAME that its daemon is sending, if it has not switched yet.",
                             discussion: "Ctrl-C on a running `epcopy migrate` does the same."))
    var cancel = false
    @Flag(help: ArgumentHelp("Wait for the migration of NAME that its daemon sends (or took up again after a restart), and print its result.",
                             discussion: "With --to, first send the switched migration to its destination at that address (another address of the same host). The other options are those the migration was started with; they are not needed here."))
    var resume = false
    @Option(help: "enlightened, postcopy or precopy.") var mode = "enlightened"
    @Flag(help: "Verify destination memory against the source at STOP.") var verify = false
    @Flag(help: "Do not ask the guest agent (plain external post-copy).") var noAgent = false
    @Option(help: "How long to wait for each guest agent report, in ms.") var agentTimeoutMs = 3000
    @Option(help: ArgumentHelp("After the switch, how long the engines try to get a lost link back, in seconds.",
                               discussion: "0 makes a lost link fail the migration at once, which leaves the VM stuck."))
    var reconnectDeadline: Double = 120
    @Option(help: "Silence between the engines that counts as a lost link, in ms.") var keepaliveTimeoutMs = 2000
    @Option(name: .customLong("numa-node"), help: ArgumentHelp(
        "Enlightened mode: the destination host's NUMA node for the guest's RAM, auto or a node number.",
        discussion: "Default: the destination daemon's own (serve --numa-node, auto unless set). The result's "
            + "numa_node and pages_on_node_fraction say where the pages landed.", valueName: "node"))
    var numaNode: String?
    @OptionGroup var daemon: DaemonOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard MigrationMode(rawValue: mode) != nil else { throw ValidationError("--mode: enlightened, postcopy or precopy") }
        guard (1...60_000).contains(agentTimeoutMs) else { throw ValidationError("--agent-timeout-ms: 1...60000") }
        guard reconnectDeadline.isFinite, (0...86_400).contains(reconnectDeadline) else {
            throw ValidationError("--reconnect-deadline: 0...86400 seconds")
        }
        guard (200...600_000).contains(keepaliveTimeoutMs) else {
            throw ValidationError("--keepalive-timeout-ms: 200...600000")
        }
        if cancel && resume { throw ValidationError("--cancel and --resume: one or the other") }
        if resume, let to { _ = try parseEndpoint(to, option: "--to") }
        if cancel || resume { return }
        guard let to else { throw ValidationError("--to is required (or --cancel, or --resume)") }
        let first = try parseEndpoint(to, option: "--to")
        guard failoverAfter.isFinite, (0.1...600).contains(failoverAfter) else {
            throw ValidationError("--failover-after: 0.1...600 seconds")
        }
        if keepSourceDefinition && !libvirt { throw ValidationError("--keep-source-definition needs --libvirt") }
        if let numaNode, NumaRequest(numaNode) == nil { throw ValidationError("--numa-node: auto or a node number") }
        if alsoTo.isEmpty { return }
        if libvirt { throw ValidationError("--also-to: not for libvirt domains (libvirt migrates over one path)") }
        guard mode == MigrationMode.enlightened.rawValue else {
            throw ValidationError("--also-to needs --mode enlightened: QEMU's own migration stream has one address")
        }
        guard alsoTo.count <= 8 else { throw ValidationError("--also-to: at most 8 other addresses") }
        var seen: Set<String> = ["\(first)"]
        for text in alsoTo {
            let other = try parseEndpoint(text, option: "--also-to")
            guard seen.insert("\(other)").inserted else { throw ValidationError("--also-to \(text): given twice (or is --to)") }
        }
    }

    func run() throws {
        if cancel {
            _ = try daemon.request(.cancel(name: name))
            print("cancelled: \(name) keeps running on its source host")
            return
        }
        if resume {
            if let to {
                _ = try daemon.request(.redirect(name: name, to: to))
                FileHandle.standardError.write(Data("redirected: the migration of \(name) reaches its destination at \(to) from now on\n".utf8))
            }
            guard case .result(let result) = try daemon.request(.resume(name: name), timeoutMillis: 3_600_000) else {
                throw CLIError("the daemon returned no result")
            }
            try show(result)
            return
        }
        let to = self.to!
        let showProgress = !output.json && isatty(STDOUT_FILENO) != 0
        var options = MigrationRequestOptions(mode: MigrationMode(rawValue: mode)!, verify: verify, agent: !noAgent,
                                              agentTimeoutMillis: agentTimeoutMs,
                                              reconnectTimeoutMillis: Int(reconnectDeadline * 1000),
                                              keepaliveTimeoutMillis: keepaliveTimeoutMs,
                                              failoverAfterMillis: alsoTo.isEmpty ? nil : Int(failoverAfter * 1000))
        options.numaNode = numaNode
        let result: MigrationResult
        do {
            let channel = try daemon.connect()
            // Ctrl-C asks the daemon to call the migration off; before the switch the VM stays where it is,
            // after it the daemon refuses and says why, and this command goes on showing the migration.
            signal(SIGINT, SIG_IGN)
            let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
            interrupt.setEventHandler { [daemon, name] in
                let answer: String
                do {
                    _ = try daemon.request(.cancel(name: name))
                    answer = "cancel requested: \(name) stays on its source host"
                } catch { answer = "cannot cancel: \(error)" }
                FileHandle.standardError.write(Data("\n\(answer)\n".utf8))
            }
            interrupt.resume()
            defer { interrupt.cancel() }
            try channel.send(.migrate({
                var request = MigrateRequest(name: name, to: to, alsoTo: alsoTo, options: options)
                if libvirt { (request.libvirt, request.keepSourceDefinition) = (true, keepSourceDefinition) }
                return request
            }()))
            var reply = try channel.receiveReply(timeoutMillis: 3_600_000)
            while case .progress(let progress) = reply {
                if showProgress { ProgressBar.draw(progress, label: "\(name) → \(to) (\(mode))") }
                reply = try channel.receiveReply(timeoutMillis: 3_600_000)
            }
            if showProgress { print("") }
            guard case .result(let r) = reply else { throw CLIError("the daemon returned no result") }
            result = r
        } catch let error as ControlError {
            if showProgress { print("") }
            throw CLIError("\(error)")
        }
        try show(result)
    }

    /// Prints a migration's result (the table, or --json); fails when the guest or a page is wrong.
    private func show(_ result: MigrationResult) throws {
        if output.json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            print(String(decoding: try encoder.encode(result), as: UTF8.self))
        } else {
            print(MigrationTable.header)
            print(MigrationTable.row(result))
            if let line = MigrationTable.agentLine(result) { print(line) }
            if let line = MigrationTable.linkLine(result) { print(line) }
            if let line = MigrationTable.libvirtLine(result) { print(line) }
        }
        if result.mismatchedPages != 0 || result.guestVerdict != "OK" { throw ExitCode(1) }
    }
}

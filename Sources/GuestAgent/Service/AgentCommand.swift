// The agent's command line, shared by the static guest binary (`epcopy-agent`) and the host CLI
// (`epcopy agent`): serve on the virtio-serial port, or take one census and print it (`--once`), which is also
// how an operator checks what the agent would report on a guest or an ordinary Linux host.

#if canImport(Glibc)
import Glibc
#endif
import EpcopyProtocol

public enum AgentCommand {
    public static let usage = """
        USAGE: epcopy-agent [--port NAME] [--window-ms MS]
               epcopy-agent --once [--json] [--window-ms MS]

        Runs as root inside a guest. Without --once it serves the host engine on the virtio-serial port NAME
        (default \(AgentPort.defaultName), found under \(AgentPort.sysfs)/*/name): hot reports before a
        migration, free-page reports right after the VM resumes on the destination.

        --once         classify every page of System RAM once (/proc/iomem, /proc/kpageflags, and idle page
                       tracking where the kernel has it), print the counts and exit
        --json         with --once: one JSON object (ram_pages, free_pages, classes, ...)
        --window-ms MS with --once: observation window for idle page tracking (default 0: page flags only)
        --port NAME    the port to serve on
        """

    /// Parses `arguments` (without the program name) and runs; returns the exit status.
    public static func main(arguments: [String]) -> Int32 {
        var config = AgentConfig()
        var once = false
        var json = false
        var window: UInt32 = 0
        var index = 0
        func value(_ flag: String) -> String? {
            index += 1
            guard index < arguments.count else {
                printError("epcopy-agent: \(flag) needs a value")
                return nil
            }
            return arguments[index]
        }
        while index < arguments.count {
            switch arguments[index] {
            case "--once": once = true
            case "--json": json = true
            case "--port":
                guard let v = value("--port") else { return 64 }
                config.portName = v
            case "--window-ms":
                guard let v = value("--window-ms"), let ms = UInt32(v), ms <= ReportRequest.maxWindowMillis else {
                    printError("epcopy-agent: --window-ms takes 0...\(ReportRequest.maxWindowMillis)")
                    return 64
                }
                window = ms
            case "-h", "--help":
                print(usage)
                return 0
            default:
                printError("epcopy-agent: unknown argument '\(arguments[index])'\n\n\(usage)")
                return 64
            }
            index += 1
        }
        if json && !once {
            printError("epcopy-agent: --json only goes with --once")
            return 64
        }
        if once { return runOnce(config: config, json: json, window: window) }
        AgentService(config: config, log: { printError("epcopy-agent: \($0)") }).run()
    }

    static func runOnce(config: AgentConfig, json: Bool, window: UInt32) -> Int32 {
        let census: PageCensus
        do { census = try Collector.census(config.sources, windowMillis: window) } catch {
            printError("epcopy-agent: \(error)\(geteuid() == 0 ? "" : " (the agent must run as root)")")
            return 1
        }
        let usage = GuestFiles.selfUsage()
        let memFree = meminfoPages("MemFree")
        let kernelFree = vmstatPages("nr_free_pages")
        if json {
            print(onceJSON(census, cpuSeconds: usage.cpuSeconds, maxRSSKiB: usage.maxRSSKiB, memFreePages: memFree,
                           kernelFreePages: kernelFree))
        } else {
            print("System RAM:  \(census.ramMap.count) pages in \(census.ramMap.rangeCount) ranges")
            for c in PageClass.allCases { print(pad(jsonName(c), 14) + "\(census.count(c)) pages") }
            if let memFree { print("MemFree:     \(memFree) pages (/proc/meminfo)") }
            if let kernelFree { print("nr_free:     \(kernelFree) pages (/proc/vmstat nr_free_pages)") }
            print("recent from: \(census.recentSignal)\(census.windowMillis > 0 ? " over \(census.windowMillis) ms" : "")")
            print("scan:        \(formatMillis(census.scanMicros)) ms, agent CPU \(formatMillis(UInt64(usage.cpuSeconds * 1e6))) ms, "
                  + "max RSS \(usage.maxRSSKiB) KiB")
        }
        return 0
    }

    /// The `--once --json` object; field names are a contract (tests and operators read them).
    public static func onceJSON(_ census: PageCensus, cpuSeconds: Double, maxRSSKiB: Int, memFreePages: UInt64?,
                                kernelFreePages: UInt64?) -> String {
        let classes = PageClass.allCases.map { "\"\(jsonName($0))\":\(census.count($0))" }.joined(separator: ",")
        var fields = [
            "\"ram_pages\":\(census.ramMap.count)",
            "\"ram_ranges\":\(census.ramMap.rangeCount)",
            "\"free_pages\":\(census.free.count)",
            "\"classes\":{\(classes)}",
            "\"recent_signal\":\"\(census.recentSignal)\"",
            "\"window_ms\":\(census.windowMillis)",
            "\"scan_ms\":\(formatMillis(census.scanMicros))",
            "\"agent_cpu_ms\":\(formatMillis(UInt64(cpuSeconds * 1e6)))",
            "\"agent_max_rss_kib\":\(maxRSSKiB)",
        ]
        if let memFreePages { fields.append("\"mem_free_pages\":\(memFreePages)") }
        if let kernelFreePages { fields.append("\"kernel_free_pages\":\(kernelFreePages)") }
        return "{" + fields.joined(separator: ",") + "}"
    }

    /// Class names as JSON keys and table labels.
    public static func jsonName(_ pageClass: PageClass) -> String {
        switch pageClass {
        case .kernel: "kernel"
        case .recent: "recent"
        case .inUse: "in_use"
        case .believedFree: "believed_free"
        }
    }

    /// A field of /proc/meminfo (kB) in pages.
    public static func meminfoPages(_ field: String, path: String = "/proc/meminfo") -> UInt64? {
        guard let text = try? GuestFiles.readText(path) else { return nil }
        for line in text.split(whereSeparator: \.isNewline) where line.hasPrefix(field + ":") {
            let fields = line.split(separator: " ")
            if fields.count >= 2, let kib = UInt64(fields[1]) { return kib / 4 }
        }
        return nil
    }

    /// A counter of /proc/vmstat (already in pages). `nr_free_pages` is the buddy allocator's own count of free
    /// pages — what KPF_BUDDY marks. MemFree usually equals it, but need not: on this project's 6.18 build host
    /// MemFree is 2.4× nr_free_pages.
    public static func vmstatPages(_ field: String, path: String = "/proc/vmstat") -> UInt64? {
        guard let text = try? GuestFiles.readText(path) else { return nil }
        for line in text.split(whereSeparator: \.isNewline) {
            let fields = line.split(separator: " ")
            if fields.count == 2, fields[0] == field, let pages = UInt64(fields[1]) { return pages }
        }
        return nil
    }

    static func formatMillis(_ micros: UInt64) -> String {
        let tenths = (micros + 50) / 100
        return "\(tenths / 10).\(tenths % 10)"
    }

    static func pad(_ s: String, _ width: Int) -> String {
        s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
    }

    static func printError(_ text: String) {
        let line = Array((text + "\n").utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress!, $0.count) }
    }
}

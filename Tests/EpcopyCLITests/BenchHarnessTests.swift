// The benchmark harness end to end, short (24 s of load): a 1 GiB memcached VM migrated once (enlightened, --verify) under CPU
// contention. Load must have been generated before and after the switch, events recorded, results computed,
// the plot drawn, and the destination's memory verified page by page.

import EpcopyTestSupport
import Foundation
import Testing

@Suite(.serialized, .tier(.qemu), .requires(.benchImage)) struct BenchHarnessTests {
    @Test
    func aShortRunProducesResultsAndPlots() throws {
        let out = "/tmp/epcopy-bench-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: out) }
        let result = try runEpcopy(["bench", "migrate", "--workload", "memcached", "--modes", "enlightened",
                                    "--guest-mem", "1024", "--warmup-mb", "32", "--duration", "24",
                                    "--contention-at", "3", "--migrate-at", "6", "--verify", "--out", out, "--json"])
        #expect(result.status == 0, "\(result.stderr.suffix(2000))")
        let summary = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]],
                                   "\(result.stdout.suffix(1000))")
        let row = try #require(summary.first)
        #expect(row["mode"] as? String == "enlightened")
        #expect(row["mismatched_pages"] as? Int == 0)
        #expect((row["bytes_wire"] as? Int ?? 0) > 0)
        #expect(row["pre_rate_ops"] as? Double ?? 0 > 0)

        let dir = "\(out)/memcached-enlightened"
        let migrate = try #require(try JSONSerialization.jsonObject(
            with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/migrate.json"))) as? [String: Any])
        #expect(migrate["mismatched_pages"] as? Int == 0)
        #expect((migrate["pages_compared"] as? Int ?? 0) > 0)
        let events = try #require(try JSONSerialization.jsonObject(
            with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/events.json"))) as? [String: Any])
        for key in ["load_start_unix", "contention_start_unix", "migration_start_unix", "stop_unix", "resume_unix",
                    "switch_unix", "migration_end_unix"] {
            #expect(events[key] as? Double != nil, "event \(key) missing")
        }
        // Load before the migration and after the client followed the VM to host B.
        let rows = try String(contentsOfFile: "\(dir)/load.csv", encoding: .utf8).split(separator: "\n").dropFirst()
            .map { $0.split(separator: ",", omittingEmptySubsequences: false) }
        let switchAt = try #require(events["switch_unix"] as? Double)
        let before = rows.filter { Double($0[12])! < switchAt }.reduce(0) { $0 + Int($1[1])! }
        let after = rows.filter { Double($0[12])! > switchAt + 1 }.reduce(0) { $0 + Int($1[1])! }
        #expect(before > 0 && after > 0, "ops before \(before), after \(after)")
        #expect(rows.last.map { String($0[9]).hasSuffix(":11211") && !String($0[9]).hasSuffix(".1:11211") } == true,
                "the client did not end on host B: \(rows.last.map { String($0[9]) } ?? "")")
        let png = try Data(contentsOf: URL(fileURLWithPath: "\(out)/throughput.png"))
        #expect(png.count > 1000 && png.starts(with: [0x89, 0x50, 0x4E, 0x47]))
        #expect(try String(contentsOfFile: "\(out)/throughput.svg", encoding: .utf8).contains("<svg"))
        // Nothing left behind.
        #expect(!shOutput("ip netns list").contains("epcb"), "namespaces left")
        #expect(!shOutput("pgrep -af qemu-system").contains("bench"), "a benchmark QEMU is still running")
    }
}

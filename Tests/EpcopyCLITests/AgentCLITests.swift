// `epcopy agent --once` as an operator runs it on a host: one JSON object whose classes add up to System RAM,
// and clear refusals for wrong flags.

import EpcopyTestSupport
import Foundation
import Testing

@Suite(.tier(.linux)) struct AgentCLITests {
    @Test(.enabled(if: geteuid() == 0, "reading /proc/kpageflags needs root"))
    func onceJSONAddsUp() throws {
        let result = try runEpcopy(["agent", "--once", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let ram = try #require(object["ram_pages"] as? Int)
        let classes = try #require(object["classes"] as? [String: Int])
        #expect(Set(classes.keys) == ["kernel", "recent", "in_use", "believed_free"])
        #expect(classes.values.reduce(0, +) == ram)
        #expect(object["free_pages"] as? Int == classes["believed_free"])
        for key in ["scan_ms", "agent_cpu_ms", "agent_max_rss_kib", "recent_signal", "kernel_free_pages"] {
            #expect(object.keys.contains(key), "missing \(key)")
        }
    }

    @Test func jsonWithoutOnceIsRefused() throws {
        let result = try runEpcopy(["agent", "--json"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("--json goes with --once"))
    }
}

// The guest agent in real migrations: free pages are never sent (and the guest does not notice), pages freed
// and reallocated through the switch stay correct migration after migration, and without an agent the
// migration still works and says it was not enlightened.

import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

@Suite(.serialized, .tier(.qemu), .requires(.testGuest)) struct AgentMigrationTests {
    /// A guest with most of its RAM free — 300 MiB of it dirty, as after a burst of use, so QEMU's own migration
    /// (which skips only zero pages) has to send it. (Enlightened can only send less than half of what QEMU
    /// sends if more of the guest is free and dirty than is in use.)
    static let mostlyFree = "console=ttyS0 quiet epcopy.memtest_mib=64 epcopy.seed=5 epcopy.dirty_free_mib=300"

    @Test func freePagesAreNeverSent() throws {
        let source = try GuestFixture.bootedGuest("agent-free-\(getpid())", append: Self.mostlyFree)
        let (result, destination) = try Migration.run(source: source, options: MigrationOptions(
            mode: .enlightened, verify: true, preloadLibrary: GuestFixture.preload))
        destination.kill()
        destination.teardown()
        print("enlightened with agent: \(result)")
        #expect(result.enlightened == true, "notes: \(result.agentNotes ?? [])")
        #expect(result.mismatchedPages == 0)
        #expect(result.guestVerdict == "OK")
        let regionPages = source.config.regionPages
        let free = try #require(result.pagesReportedFree)
        #expect(free > regionPages * 4 / 10, "the guest reported only \(free) free pages")
        let nonFreeBytes = Double((regionPages - free) * 4096)
        #expect(Double(result.bytesWire) <= 1.05 * nonFreeBytes,
                "bytes on the wire \(result.bytesWire) vs non-free \(UInt64(nonFreeBytes))")
        #expect((result.pagesSkippedFree ?? 0) > 0)

        // QEMU's own postcopy on the same guest image and command line.
        let baseline = try GuestFixture.bootedGuest("agent-free-pc-\(getpid())", append: Self.mostlyFree)
        let (postcopy, pcDestination) = try Migration.run(source: baseline, options: MigrationOptions(
            mode: .postcopy, verify: true, preloadLibrary: GuestFixture.preload))
        pcDestination.kill()
        pcDestination.teardown()
        print("QEMU postcopy: \(postcopy)")
        #expect(postcopy.guestVerdict == "OK")
        #expect(Double(result.bytesWire) < 0.5 * Double(postcopy.bytesWire),
                "enlightened \(result.bytesWire) B vs QEMU postcopy \(postcopy.bytesWire) B")
    }

    /// Memory freed and reallocated continuously through the switch (the tester gives pages back with
    /// MADV_DONTNEED and rewrites them), migrated back and forth ten times: every migration verifies, and the
    /// guest's own check finds no corrupt page.
    @Test func pagesFreedThroughTheSwitchStayCorrect() throws {
        var vm = try GuestFixture.bootedGuest("agent-churn-\(getpid())", append:
            "console=ttyS0 quiet epcopy.memtest_mib=96 epcopy.seed=21 epcopy.memtest_churn_pct=10 epcopy.memtest_period_ms=250")
        defer { vm.kill(); vm.teardown() }
        var freedTotal: UInt64 = 0
        for round in 1...10 {
            let (result, next) = try Migration.run(source: vm, options: MigrationOptions(
                mode: .enlightened, verify: true, preloadLibrary: GuestFixture.preload, settleSeconds: 2))
            vm = next
            print("churn round \(round): \(result)")
            #expect(result.mismatchedPages == 0, "round \(round)")
            #expect(result.guestVerdict == "OK", "round \(round): \(next.serialLog.suffix(400))")
            #expect(result.enlightened == true, "round \(round): \(result.agentNotes ?? [])")
            freedTotal += result.pagesReportedFree ?? 0
        }
        #expect(!vm.serialLog.contains("CORRUPT"))
        #expect(freedTotal > 0)
    }

    @Test func withoutAnAgentItIsPlainPostCopyAndSaysSo() throws {
        let source = try GuestFixture.bootedGuest("agent-none-\(getpid())",
                                                  append: "console=ttyS0 quiet epcopy.memtest_mib=64 epcopy.agent=0")
        var options = MigrationOptions(mode: .enlightened, verify: true, preloadLibrary: GuestFixture.preload)
        options.agentTimeoutMillis = 1000
        options.freeScanTimeoutMillis = 1000
        let (result, destination) = try Migration.run(source: source, options: options)
        destination.kill()
        destination.teardown()
        print("enlightened without agent: \(result)")
        #expect(result.enlightened == false)
        #expect(result.agentNotes?.contains { $0.contains("no agentHello") } == true, "\(result.agentNotes ?? [])")
        #expect(result.pagesReportedFree == nil)
        #expect(result.mismatchedPages == 0)
        #expect(result.guestVerdict == "OK")
    }
}

extension AgentMigrationTests {
    /// Both agents hostile, in a real migration: the source's lies that every page is free (so the push waits for
    /// a free scan) and babbles garbage; the destination's floods, then reports frames far outside RAM. The
    /// engines take over the agent ports' sockets (QEMU passes a guest's bytes through unchanged, so these are
    /// the bytes a hostile guest agent could produce). The migration must verify, and end as plain post-copy.
    @Test func hostileAgentsCannotBreakAMigration() throws {
        let source = try GuestFixture.bootedGuest("agent-hostile-\(getpid())",
                                                  append: "console=ttyS0 quiet epcopy.memtest_mib=64 epcopy.agent=0")
        let regionPages = source.config.regionPages
        unlink(source.config.agentSocket)
        let liar = try FakeAgent(path: source.config.agentSocket) { fd in
            FakeAgent.serve(fd) { message in
                FakeAgent.write(fd, (0..<5000).map { _ in UInt8.random(in: 0...255) })
                switch message {
                case .hostHello:
                    FakeAgent.write(fd, AgentMessage.agentHello(try! AgentHello(agentVersion: "liar",
                                                                                kernelRelease: "6.1")).encodedFrame())
                case .reportRequest(let r):
                    let all = PageSet<GuestFrameNumber>(try! PageRange(start: GuestFrameNumber(rawValue: 0),
                                                                       count: regionPages))
                    let report = try! HotReport(requestID: r.requestID, windowMillis: 0, collectMicros: 1, ramMap: all,
                                                classes: [ClassifiedPages(.believedFree, all)])
                    FakeAgent.write(fd, AgentMessage.hotReport(report).encodedFrame())
                default: break
                }
            }
        }
        defer { liar.finish() }
        let session = UInt64.random(in: 1...UInt64.max)
        var options = MigrationOptions(mode: .enlightened, verify: true, preloadLibrary: GuestFixture.preload)
        options.agentTimeoutMillis = 1500
        let destination = try DestinationSide(spec: VMSpec(source.config), name: "agent-hostile-dst-\(getpid())",
                                              mode: .enlightened, session: session, bindHost: "127.0.0.1",
                                              options: options)
        defer { destination.qemu.kill(); destination.qemu.teardown() }
        unlink(destination.qemu.config.agentSocket)
        let flooder = try FakeAgent(path: destination.qemu.config.agentSocket) { fd in
            let pong = AgentMessage.pong(nonce: 1).encodedFrame()
            FakeAgent.write(fd, Array((0..<3000).map { _ in pong }.joined()))
            let far = PageSet<GuestFrameNumber>(try! PageRange(start: GuestFrameNumber(rawValue: 1 << 33), count: 1 << 20))
            FakeAgent.serve(fd) { message in
                guard case .vmResumed(let r) = message else { return }
                FakeAgent.write(fd, AgentMessage.freeReport(FreeReport(requestID: UInt32(truncatingIfNeeded: r.sequence),
                                                                       scanMicros: 1, free: far)).encodedFrame())
            }
        }
        defer { flooder.finish() }
        let sourceOutcome = try SourceSide.migrate(source: source, mode: .enlightened, session: session,
                                                   destinationURI: destination.migrationURI,
                                                   engineEndpoint: destination.engineEndpoint, options: options)
        let result = Migration.combine(source: sourceOutcome, destination: try destination.finish(),
                                       destinationSide: destination, options: options)
        print("hostile agents: \(result)")
        #expect(result.mismatchedPages == 0)
        #expect(result.pagesCompared > 0)
        #expect(result.guestVerdict == "OK")
        #expect(result.pagesReportedFree == nil, "a free report from the flooder was believed")
        #expect(result.agentNotes?.contains { $0.contains("flood") || $0.contains("rejected") } == true,
                "\(result.agentNotes ?? [])")
        #expect(!source.isRunning)
    }
}

extension AgentMigrationTests {
    /// The daemon's background hot report: a keeper asks every second; the migration starts from its latest report
    /// without asking the agent at the switch, and still verifies. A kept report past the age limit is not used:
    /// the switch asks for a new one and says so.
    @Test func aKeptHotReportSparesTheSwitchItsScan() throws {
        var vm = try GuestFixture.bootedGuest("agent-kept-\(getpid())",
                                              append: "console=ttyS0 quiet epcopy.memtest_mib=64 epcopy.seed=9")
        defer { vm.kill(); vm.teardown() }
        let keeper = HotReportKeeper(socketPath: vm.config.agentSocket, regionPages: vm.config.regionPages,
                                     everyMillis: 1000)
        #expect(waitUntil(deadline: .seconds(30), poll: .milliseconds(50)) { keeper.counts.reports >= 2 },
                "keeper: \(keeper.counts)")
        let stopStart = Date()
        let kept = try #require(keeper.stop())
        #expect(Date().timeIntervalSince(stopStart) < 1, "stopping the keeper took too long")
        #expect(kept.pages.contains { $0.0 == .kernel && !$0.1.isEmpty })

        var options = MigrationOptions(mode: .enlightened, verify: true, preloadLibrary: GuestFixture.preload)
        options.keptHotReport = kept
        options.freshReportBudgetMillis = 0  // use the kept report as is (a responsive agent would win otherwise)
        let (result, next) = try Migration.run(source: vm, options: options)
        vm = next
        print("with a kept hot report: \(result)")
        #expect(result.enlightened == true, "notes: \(result.agentNotes ?? [])")
        #expect(result.mismatchedPages == 0)
        #expect(result.guestVerdict == "OK")
        let age = try #require(result.agentReportAgeMillis)
        #expect(age >= 0 && age < 30_000)
        #expect((result.agentReportMillis ?? .infinity) < 50, "the switch still waited for the agent")
        #expect((result.pagesByClass?["kernel"] ?? 0) > 0)

        // Too old: asked again at the switch.
        options.hotReportMaxAgeMillis = 0
        let (again, last) = try Migration.run(source: vm, options: options)
        vm = last
        #expect(again.mismatchedPages == 0)
        #expect(again.agentReportAgeMillis == nil)
        #expect((again.agentNotes ?? []).contains { $0.contains("asked for a new one") }, "\(again.agentNotes ?? [])")
        #expect(again.enlightened == true)

        // A fresh report within the budget wins over a kept one; the kept one is there if the agent is slow.
        options.hotReportMaxAgeMillis = 30_000
        options.freshReportBudgetMillis = 3000
        options.keptHotReport = kept
        let (fresh, after) = try Migration.run(source: vm, options: options)
        vm = after
        #expect(fresh.mismatchedPages == 0)
        #expect(fresh.agentReportAgeMillis == nil, "the kept report was used: \(fresh.agentNotes ?? [])")
        #expect(fresh.enlightened == true)
    }
}

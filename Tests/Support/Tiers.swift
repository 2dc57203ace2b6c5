// The suite's three tiers, and the trait that runs a suite only when its tier is selected:
//   unit  — pure Swift: codecs, schedulers, bitmaps; no kernel features, no processes.
//   linux — this kernel's features: userfaultfd, io_uring, sockets, namespaces, child processes; no QEMU.
//   qemu  — real QEMU guests (TCG here): launcher, QMP, migrations, the daemons, the benchmark harness.
// EPCOPY_TEST_TIER=unit,linux selects tiers (unset: all); `make test-unit`, `test-linux` and `test-qemu` set it.
// A suite outside the selection is skipped with the reason, so a filtered run still says what it did not run.

import Foundation
import Testing

public enum TestTier: String, CaseIterable, Sendable {
    case unit, linux, qemu

    /// The tiers EPCOPY_TEST_TIER names; all of them when it is unset or empty.
    public static var selected: Set<TestTier> {
        guard let value = ProcessInfo.processInfo.environment["EPCOPY_TEST_TIER"], !value.isEmpty else {
            return Set(allCases)
        }
        let names = value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        let tiers = names.compactMap(TestTier.init(rawValue:))
        // A misspelt tier must not silently select nothing: it selects everything, and says so once.
        if tiers.count != names.count {
            FileHandle.standardError.write(Data(
                "EPCOPY_TEST_TIER=\(value): unknown tier (expected unit, linux, qemu); running all tiers\n".utf8))
            return Set(allCases)
        }
        return Set(tiers)
    }
}

extension Trait where Self == ConditionTrait {
    /// Runs the suite or test only when `tier` is selected (see the file header).
    public static func tier(_ tier: TestTier) -> Self {
        let selection = TestTier.selected.map(\.rawValue).sorted().joined(separator: ",")
        return .enabled(if: TestTier.selected.contains(tier),
                        Comment(rawValue: "tier \(tier.rawValue) is not selected (EPCOPY_TEST_TIER=\(selection))"))
    }

    /// Runs the suite or test only when `prerequisite` is met; otherwise skips it with the reason and the fix.
    public static func requires(_ prerequisite: Prerequisite) -> Self {
        .enabled(if: prerequisite.isMet, Comment(rawValue: prerequisite.reason))
    }
}

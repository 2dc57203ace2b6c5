// The CLI as a user runs it: the real `epcopy` binary, its exit status and its output.

import EpcopyTestSupport
import Foundation
import Testing

/// Runs the `epcopy` built next to this test bundle.
func runEpcopy(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    let products = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    let process = Process()
    process.executableURL = products.appendingPathComponent("epcopy")
    process.arguments = arguments
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
}

@Suite(.tier(.linux)) struct ProbeCLITests {
    @Test func probeJSONIsOneObjectWithTheContractKeys() throws {
        let result = try runEpcopy(["probe", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        for key in ["kernel", "userfaultfd", "uffd_features", "shmem_missing", "io_uring", "qemu", "accel",
                    "numa_nodes", "libvirt"] {
            #expect(object.keys.contains(key), "missing key \(key)")
        }
        #expect(object["userfaultfd"] as? Bool == true)
        #expect(object["io_uring"] as? Bool == true)
        #expect(object["shmem_missing"] as? Bool == true)
        let features = try #require(object["uffd_features"] as? [String: Bool])
        #expect(features["missing_shmem"] == true)
        #expect(["tcg", "kvm", "none"].contains(object["accel"] as? String ?? ""))
    }

    @Test func probeTextHasAHumanLinePerField() throws {
        let result = try runEpcopy(["probe"])
        #expect(result.status == 0)
        for label in ["kernel", "userfaultfd", "uffd features", "shmem MISSING", "io_uring", "qemu", "accel",
                      "numa nodes", "libvirt"] {
            #expect(result.stdout.contains("\n\(label) ") || result.stdout.hasPrefix("\(label) "), "no \(label) line")
        }
    }

    @Test func helpListsOnlyWorkingSubcommands() throws {
        let result = try runEpcopy(["--help"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("probe"))
        #expect(result.stdout.contains("bench"))
    }

    @Test func unknownSubcommandFailsWithUsage() throws {
        let result = try runEpcopy(["teleport"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("Unexpected argument") || result.stderr.contains("unknown"), "\(result.stderr)")
    }
}

// swift-tools-version:6.0
// epcopy — enlightened post-copy VM migration. The folder tree follows the data path:
// GuestAgent → Protocol → HostEngine → QEMU; the CLI (Sources/epcopy) only wires them together.
import PackageDescription

let package = Package(
    name: "epcopy",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "epcopy", targets: ["epcopy"]),
        // Built with -static-executable into the guest image (make agent): only glibc, statically linked.
        .executable(name: "epcopy-agent", targets: ["epcopy-agent"]),
        // The same static build: the engine's NUMA placement checked inside a two-node test guest.
        .executable(name: "epcopy-numa-check", targets: ["epcopy-numa-check"]),
        .library(name: "EpcopyPreload", type: .dynamic, targets: ["EpcopyPreload"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // The only hand-written C that Swift calls: variadic syscall()/ioctl(), _IOWR constants, uffd_msg.
        .target(name: "CEpcopyLinux", path: "Sources/CEpcopyLinux"),
        .systemLibrary(name: "CURing", path: "Sources/CURing", pkgConfig: "liburing",
                       providers: [.apt(["liburing-dev"])]),
        .systemLibrary(name: "CNuma", path: "Sources/CNuma", pkgConfig: "numa",
                       providers: [.apt(["libnuma-dev"])]),
        .systemLibrary(name: "CVirt", path: "Sources/CVirt", pkgConfig: "libvirt",
                       providers: [.apt(["libvirt-dev"])]),

        // Pure Swift wire formats: no Foundation, no Glibc. Depends on nothing.
        .target(name: "EpcopyProtocol", path: "Sources/Protocol"),
        // The in-guest agent's collectors. Never depends on HostEngine.
        .target(name: "EpcopyGuestAgent", dependencies: ["EpcopyProtocol"], path: "Sources/GuestAgent"),
        // NUMA placement (topology, node choice, mbind, numa_maps): glibc and FoundationEssentials only, so that it
        // also builds into a static binary for a guest (epcopy-numa-check). Part of the engine (re-exported).
        .target(name: "EpcopyNuma", dependencies: ["CEpcopyLinux"], path: "Sources/Numa"),
        // The engine: syscalls, uffd, transfer, QEMU control. Never depends on GuestAgent.
        .target(name: "EpcopyHostEngine",
                dependencies: ["EpcopyProtocol", "CEpcopyLinux", "EpcopyNuma", "CURing", "CNuma", "CVirt",
                               .product(name: "Histogram", package: "hdrhistogram-swift"),
                               .product(name: "Logging", package: "swift-log")],
                path: "Sources/HostEngine"),
        .executableTarget(name: "epcopy",
                          dependencies: ["EpcopyProtocol", "EpcopyGuestAgent", "EpcopyHostEngine",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                         .product(name: "Logging", package: "swift-log")],
                          path: "Sources/epcopy"),
        .target(name: "EpcopyPreload", dependencies: ["CEpcopyLinux"], path: "Sources/EpcopyPreload",
                linkerSettings: [.linkedLibrary("dl")]),
        .executableTarget(name: "epcopy-agent", dependencies: ["EpcopyGuestAgent"], path: "Sources/epcopy-agent"),
        .executableTarget(name: "epcopy-numa-check", dependencies: ["EpcopyNuma", "CEpcopyLinux"],
                          path: "Sources/epcopy-numa-check"),
        .executableTarget(name: "epcopy-memtouch", path: "Sources/MemToucher"),

        // What every test tier shares: tiers, prerequisites with reasons, waits with deadlines.
        .target(name: "EpcopyTestSupport", path: "Tests/Support"),
        .testTarget(name: "EpcopyProtocolTests", dependencies: ["EpcopyProtocol", "EpcopyTestSupport"],
                    path: "Tests/EpcopyProtocolTests"),
        .testTarget(name: "EpcopyGuestAgentTests", dependencies: ["EpcopyGuestAgent", "EpcopyTestSupport"],
                    path: "Tests/EpcopyGuestAgentTests"),
        .testTarget(name: "EpcopyHostEngineTests", dependencies: ["EpcopyHostEngine", "CEpcopyLinux", "EpcopyGuestAgent",
                                                              "EpcopyTestSupport"],
                    path: "Tests/EpcopyHostEngineTests"),
        .testTarget(name: "EpcopyCLITests", dependencies: ["epcopy", "EpcopyHostEngine", "EpcopyProtocol", "CEpcopyLinux",
                                                      "EpcopyTestSupport"],
                    path: "Tests/EpcopyCLITests"),
    ]
)

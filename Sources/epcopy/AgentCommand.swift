// `epcopy agent`: the guest agent's own code (EpcopyGuestAgent), runnable on any Linux host — to check what it
// would report, or to serve a port. The guest gets the same code as the static `epcopy-agent` binary.

import ArgumentParser
import EpcopyGuestAgent

struct Agent: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the guest agent here (normally inside a guest, as the static epcopy-agent binary).",
        discussion: """
            With --once it classifies every page of System RAM (/proc/iomem, /proc/kpageflags; idle page \
            tracking where the kernel has it) and prints the counts: kernel, recent (accessed in the window, \
            else ACTIVE/REFERENCED), in_use, believed_free (KPF_BUDDY: the buddy allocator's free pages, which \
            /proc/vmstat nr_free_pages counts). Needs root. Without --once it serves the host engine on the \
            virtio-serial port, as in a guest.
            """
    )
    @Flag(help: "Take one census, print it and exit.") var once = false
    @Flag(help: "With --once: one JSON object (ram_pages, free_pages, classes, ...).") var json = false
    @Option(help: "Observation window for idle page tracking, ms.") var windowMs = 0
    @Option(help: "The virtio-serial port to serve on.") var port = "org.epcopy.agent.0"

    func validate() throws {
        if json && !once { throw ValidationError("--json goes with --once") }
        guard (0...60_000).contains(windowMs) else { throw ValidationError("--window-ms: 0...60000") }
    }

    func run() throws {
        var args = ["--port", port, "--window-ms", String(windowMs)]
        if once { args.append("--once") }
        if json { args.append("--json") }
        let status = AgentCommand.main(arguments: args)
        if status != 0 { throw ExitCode(status) }
    }
}

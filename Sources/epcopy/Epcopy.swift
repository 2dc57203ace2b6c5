// The `epcopy` command: thin on purpose. Subcommands parse options and call into the modules;
// no migration logic lives here.

import ArgumentParser

@main
struct Epcopy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "epcopy",
        abstract: "Enlightened post-copy VM migration.",
        discussion: """
            A VM on an overloaded host moves its execution to the destination at once (device state only, \
            through QEMU); its RAM follows through epcopy's engines, faults first, and the source host gets \
            memory back page by page as the destination acknowledges it. Pages that are holes in the RAM \
            file are never sent. The in-guest agent (epcopy-agent) reports hot pages before the switch, so \
            they go first, and free pages right after it, so they are never sent; without it, epcopy falls \
            back to plain post-copy with neighbour prefetch.

            Start with `epcopy probe` to see what this host supports; `make demo` shows a migration \
            between two namespaced hosts; `epcopy serve`, `epcopy vm start` and `epcopy migrate` are the \
            operator's commands; `epcopy agent --once` shows what the agent would report on this host.
            """,
        subcommands: [Probe.self, Serve.self, VM.self, Migrate.self, Libvirt.self, Agent.self, Engine.self, Bench.self]
    )
}

/// Options every command that prints results shares.
struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print one JSON object instead of text. The keys are a stable contract.")
    var json = false
}

// The `epcopy` command: thin on purpose. Subcommands parse options and call into the modules;
// no migration logic lives here.

import ArgumentParser

@main
struct Epcopy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "epcopy",
        abstract: "Enlightened post-copy VM migration.",
        discussion: """
            A VM on an overloaded host moves its execution to the destination at once; the guest tells \
            epcopy which pages are free (never sent) and which are hot (sent first), and the source is \
            released as soon as the guest's real state has moved.

            Start with `epcopy probe` to see what this host supports.
            """,
        subcommands: [Probe.self, Serve.self, VM.self, Migrate.self, Engine.self, Bench.self]
    )
}

/// Options every command that prints results shares.
struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print one JSON object instead of text. The keys are a stable contract.")
    var json = false
}

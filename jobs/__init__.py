"""What a person or a cluster runs: one module per job, and the `altclip` command."""

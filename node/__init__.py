"""What every GB6 process shares: the `gb6` command, config, supervisor, wire types, errors, SDK."""

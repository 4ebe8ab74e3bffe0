"""What a job asks for: the job file's schema, reading it (YAML with line numbers, ${VAR}, tiers), durations and the machine's settings."""

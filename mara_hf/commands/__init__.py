"""The `mara-hf` subcommands built on the library: `train` (`mara-hf train`) and `eval` (`mara-hf eval`), each
its options and the function that runs it. This layer sits on top of `mara_hf.train`, `mara_hf.evaluation` and
`mara_hf.distributed` (for `--ray-workers`); none of them imports it. `mara_hf.cli` imports each module when its
subcommand is built or run; importing this package imports neither."""

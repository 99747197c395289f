"""Everything metarec runs on Ray, in one package (docs/design.md §6).

- `session`: joining Ray or starting the private loopback-only instance with token auth,
  the workers' config and threads, the one unwrapping of Ray's errors, the test-only
  fault-injection variables;
- `sessions`: the record of a driver's local instance, its session folder, reaping what a
  killed driver left; `raylet_watch`: one line and exit 2 if the local raylet dies;
- `private`: every private Ray API, behind one version check;
- `capacity`: can the cluster place the run's workers? (checked before training);
- `driver`: the driver runner (`RayRunner`, `SourceTaskWorker` actors);
- `collective`: the collective runner, the data-parallel strategy and the one flat
  all-reduce;
- `ray_train`: the training loop on Ray Train workers (collective MetaRec, data-parallel
  baselines).

Importing `metarec` does not import Ray: `metarec.launch` imports these modules only for
the modes that use them.
"""

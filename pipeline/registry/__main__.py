from pipeline.registry.cli import main

raise SystemExit(main())

from dynaconv.train.cli import main

raise SystemExit(main())

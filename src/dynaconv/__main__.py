from dynaconv.cli import main

raise SystemExit(main())

from condnoise.app.cli import main

raise SystemExit(main())

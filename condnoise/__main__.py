from condnoise.cli import main

raise SystemExit(main())

from sideproxy.cli import main

raise SystemExit(main())

from costtap.cli import main

raise SystemExit(main())

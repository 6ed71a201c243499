from tellback_sdk.cli import main

raise SystemExit(main())

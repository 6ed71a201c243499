from tellback_server.cli import main

main()

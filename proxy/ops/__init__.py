"""What operators use: the admin HTTP server (`/metrics`, `/readyz`, `/stats`, the
dashboard, reload), the statistics it reports (`stats`) and `coalesce health`
(`health_check`).

May import everything below the assembly: `coalesce.frontends`, `coalesce.core`,
`coalesce.telemetry`, `coalesce.codecs`, `coalesce.config`, `coalesce.errors`.
Never `coalesce.server` or `coalesce.cli`.
"""

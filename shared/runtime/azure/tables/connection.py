"""How a store reaches the service: Azurite's connection string and the HTTP transport."""

from __future__ import annotations

from typing import Any, Final, cast

from azure.core.pipeline.transport import AsyncHttpTransport

AZURITE_ACCOUNT: Final = "devstoreaccount1"
#: Azurite's documented, public development key (not a secret: every emulator install ships it).
AZURITE_KEY: Final = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(port: int, host: str = "127.0.0.1") -> str:
    """An explicit Azurite connection string: `UseDevelopmentStorage=true` cannot carry a custom port."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"TableEndpoint=http://{host}:{port}/{AZURITE_ACCOUNT};"
    )


def default_transport() -> AsyncHttpTransport[Any, Any]:
    """aiohttp when installed (azure-core's default), else azure-core's requests-on-threads transport."""
    try:
        from azure.core.pipeline.transport import AioHttpTransport

        return cast(AsyncHttpTransport[Any, Any], AioHttpTransport())
    except ImportError:
        from azure.core.pipeline.transport import AsyncioRequestsTransport

        return cast(AsyncHttpTransport[Any, Any], AsyncioRequestsTransport())

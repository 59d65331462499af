"""Stand-ins for systems paysaga does not own. Only the CRMs' far side is faked, as real servers."""

from .crm_server import FakeCrmServer, RecordedRequest

__all__ = ["FakeCrmServer", "RecordedRequest"]

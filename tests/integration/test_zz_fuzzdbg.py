import time, faulthandler, sys
from tests.integration.test_gateway_fuzz import *  # noqa
from tests.integration.test_gateway_fuzz import schema, BOUNDED, CHECKS, fuzzed
F = open("/tmp/dump.txt", "a")

@schema.include(path_regex="keys").parametrize()
@BOUNDED
def test_dbg(case, fuzzed):
    url, token = fuzzed
    faulthandler.dump_traceback_later(5, exit=False, file=F)
    try:
        case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=60)
    finally:
        faulthandler.cancel_dump_traceback_later()

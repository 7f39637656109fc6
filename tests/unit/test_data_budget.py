"""The DATA byte budget: messages being received reserve their size; beyond the limit, wait."""

import asyncio

from maildetour.inbound.data_budget import DataBudget


def test_reservations_fit_under_the_limit_and_one_always_goes() -> None:
    async def main() -> None:
        budget = DataBudget(100)
        assert await budget.reserve(500, wait=0)  # alone: a message larger than the limit still goes
        budget.release(500)
        assert await budget.reserve(60, wait=0) and await budget.reserve(40, wait=0)
        assert not await budget.reserve(1, wait=0.01)  # full: waited, no room came
        assert budget.used == 100

    asyncio.run(main())


def test_a_waiting_reservation_goes_when_another_is_released() -> None:
    async def main() -> None:
        budget = DataBudget(100)
        assert await budget.reserve(80, wait=0)
        waiting = asyncio.create_task(budget.reserve(50, wait=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        budget.release(80)
        assert await asyncio.wait_for(waiting, 1) is True
        assert budget.used == 50

    asyncio.run(main())


def test_a_lower_limit_applies_to_new_reservations_only() -> None:
    async def main() -> None:
        budget = DataBudget(100)
        assert await budget.reserve(90, wait=0)
        budget.limit = 50
        assert not await budget.reserve(10, wait=0)
        budget.release(90)
        assert await budget.reserve(50, wait=0) and not await budget.reserve(1, wait=0)

    asyncio.run(main())

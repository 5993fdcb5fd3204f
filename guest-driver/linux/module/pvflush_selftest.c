// SPDX-License-Identifier: GPL-2.0
/*
 * Exercises the exported calls of virtio_cache_flush.ko from kernel code,
 * where the misc device's ioctls cannot reach: with interrupts off (the
 * calls must not sleep), on a physically contiguous, unaligned range, and
 * with arguments the calls must refuse.  Loading it succeeds only when
 * every call answered as expected; each result is logged.
 */

#include <linux/bits.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/irqflags.h>
#include <linux/module.h>
#include <linux/printk.h>

#include "pvflush.h"

/* Far above any test guest's RAM: the host answers OUT_OF_RANGE. */
#define BEYOND_RAM	BIT_ULL(40)
#define ORDER		2

static int __init pvflush_selftest_init(void)
{
	unsigned long buf = __get_free_pages(GFP_KERNEL, ORDER);
	int range, all, beyond, wraps, empty;
	unsigned long flags;
	phys_addr_t phys;

	if (!buf)
		return -ENOMEM;
	phys = virt_to_phys((void *)buf);

	local_irq_save(flags);
	/* Unaligned at both ends, across all four pages. */
	range = pvflush_wbinv_range(phys + 1, (PAGE_SIZE << ORDER) - 2);
	all = pvflush_wbinv_all();
	local_irq_restore(flags);

	beyond = pvflush_wbinv_range(BEYOND_RAM, PAGE_SIZE);
	wraps = pvflush_wbinv_range(~(phys_addr_t)0 - 10, 100);
	empty = pvflush_wbinv_range(phys, 0);
	free_pages(buf, ORDER);

	pr_info("pvflush_selftest: irqs off: range %d, all %d; beyond RAM %d, wrapping %d, empty %d\n",
		range, all, beyond, wraps, empty);
	if (range || all || beyond != -ERANGE || wraps != -EINVAL || empty)
		return -EIO;
	return 0;
}

static void __exit pvflush_selftest_exit(void)
{
}

module_init(pvflush_selftest_init);
module_exit(pvflush_selftest_exit);

MODULE_DESCRIPTION("Self-test of the virtio cache-flush driver's in-kernel API");
MODULE_LICENSE("GPL");

"""result files: the file of a succeeded job's per-step metrics

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 19:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_file", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # The code before this revision reads every file as a dataset: the result files go with their column.
    op.execute("DELETE FROM files WHERE purpose = 'fine-tune-results'")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("result_file")

# Workload throughput per mode, with the noisy neighbour on y2 and the migration events.
# Written by Workloads/bench/report.py; regenerate with: cd OUT_DIR && gnuplot throughput.gp
# Data: plotdata/<dir>-load.dat (ops/s per load interval, x = s since load start, drawn as steps
# over each interval) and plotdata/<dir>-neighbour.dat (neighbour work units/s).
set encoding utf8
do for [fmt in "png svg"] {
  if (fmt eq "png") {
    set terminal pngcairo noenhanced size 1200,960 font "sans,10"
    set output "throughput.png"
  } else {
    set terminal svg noenhanced size 1200,960 dynamic font "sans,10" background rgb "white"
    set output "throughput.svg"
  }
  set multiplot layout 3,1
  set xrange [0.000:60.000]
  set grid xtics ytics lc rgb "#dddddd"
  set xlabel "s since load start"
  set key bottom left opaque box samplen 2 font ",8"
  set tics out
  set border 11
  unset arrow
  unset label
  set title "memcached enlightened: downtime 30 ms, T_release 2,809 ms"
  set yrange [0:4680.000]
  set ylabel "workload ops/s"
  set y2range [0:1854.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 23.240, graph 0 to 23.240, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 23.240, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 23.269, graph 0 to 23.269, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 23.269, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 23.692, graph 0 to 23.692, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 23.692, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 29.257, graph 0 to 29.257, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 29.257, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 1609.020 to graph 1, first 1609.020 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 526.263 to graph 1, second 526.263 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-enlightened-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-enlightened-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "memcached postcopy: downtime 107 ms, T_release 8,298 ms"
  set yrange [0:4313.253]
  set ylabel "workload ops/s"
  set y2range [0:1830.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 24.418, graph 0 to 24.418, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 24.418, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 24.525, graph 0 to 24.525, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 24.525, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 25.318, graph 0 to 25.318, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 25.318, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 31.736, graph 0 to 31.736, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 31.736, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 1032.120 to graph 1, first 1032.120 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 545.228 to graph 1, second 545.228 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-postcopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-postcopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "memcached precopy: downtime 89 ms, T_release 18,458 ms"
  set yrange [0:5238.000]
  set ylabel "workload ops/s"
  set y2range [0:1434.573]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 37.850, graph 0 to 37.850, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 37.850, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 37.939, graph 0 to 37.939, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 37.939, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 38.200, graph 0 to 38.200, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 38.200, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 41.608, graph 0 to 41.608, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 41.608, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 1434.240 to graph 1, first 1434.240 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 860.744 to graph 1, second 860.744 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-precopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-precopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset multiplot
  unset output
}
